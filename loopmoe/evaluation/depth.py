"""What the looped core does with more or fewer iterations at inference (test-time depth).

For each loop count T, on the same held-out sequences:
- ``loss``: next-token loss of the full model run with T iterations;
- ``lens``: logit lens at loop boundaries, the loss when the hidden state after iteration k
  (k = 1..T) is read out through the final norm and LM head, skipping any coda layers;
- ``routing``: per core layer, how the selected expert set of each token changes from iteration
  k-1 to k: the fraction of tokens whose set differs, and the mean Jaccard overlap of the sets.

The result also records ``trained_loops`` (the model's own T) and ``warnings``: the analysis of a
model trained with T = 1 (its core never learned to be iterated: every loop count but 1 is
untrained territory), and of text that overlaps the training data (``training_overlap``, see
``loopmoe.evaluation.overlap``; its loss is not a held-out loss), is reported but flagged.

``depth_curve`` is the cheap curve every looped arm of a comparison gets (``loopmoe compare``): the held-out
loss at each loop count as the trainer measures it (the mean of the per-batch LM loss over the run's own
validation batches, so the entry at the trained T reproduces its last ``val_loss``), the forward FLOPs per
token executed there (``loopmoe.budget``), and the expert load at the trained depth. A count the model cannot
run (``LoopMoEConfig.check_num_loops``) is listed with the reason instead of failing the curve.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from loopmoe.budget import compute_budget
from loopmoe.errors import DataError
from loopmoe.evaluation.loading import require_looped
from loopmoe.evaluation.overlap import WARN_ABOVE
from loopmoe.model.slots import cache_index


def token_sequences(ids, seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` rows of a 1-D id array (the ragged tail is dropped)."""
    n = len(ids) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise DataError(
            f"held-out text has {len(ids)} tokens, fewer than one sequence of {seq_len}: "
            "use more text or a smaller --seq-len"
        )
    return torch.as_tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def set_change(current: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: whether the top-k expert sets differ, and their Jaccard overlap (``[N, k]`` inputs)."""
    inter = (current.unsqueeze(-1) == previous.unsqueeze(-2)).any(-1).sum(-1).float()
    union = current.shape[-1] + previous.shape[-1] - inter
    return inter < current.shape[-1], inter / union


def _boundary_index(config, iteration: int) -> int:
    """Index in ``hidden_states`` of the state after core iteration ``iteration`` (1-based): the
    number of layers executed before iteration ``iteration`` (0-based) starts."""
    return cache_index(
        "core", 0, iteration, prelude=config.num_prelude_layers, core=config.num_core_layers, loops=iteration
    )


def depth_warnings(trained_loops: int, training_overlap: dict | None) -> list[str]:
    """What makes a depth analysis misleading: a T = 1 model, or text the model was trained on."""
    out = []
    if trained_loops == 1:
        out.append(
            "the model was trained with num_loops = 1: its core was never iterated in training, so every other "
            "loop count is untrained; analyse a looped model (num_loops > 1) to study test-time depth"
        )
    fraction = (training_overlap or {}).get("fraction")
    if fraction is not None and fraction > WARN_ABOVE:
        assert training_overlap is not None
        out.append(
            f"{100 * fraction:.1f}% of the text's {training_overlap['ngram']}-token windows occur in the training "
            f"data ({training_overlap['shards']}): its loss is not a held-out loss; pass held-out text, e.g. the "
            "run's shard folder (its val split)"
        )
    return out


@torch.no_grad()
def analyse_depth(
    model, sequences: torch.Tensor, loops: list[int], *, batch_size: int = 4, training_overlap: dict | None = None
) -> dict:
    """Loss, logit-lens loss and routing divergence for each loop count in ``loops`` (JSON-ready), with
    ``trained_loops``, ``training_overlap`` (as given, from ``loopmoe.evaluation.overlap``) and ``warnings``
    (also issued as ``UserWarning``)."""
    require_looped(model, "depth analysis")
    for t in loops:
        model.config.check_num_loops(t)
    device = next(model.parameters()).device
    norm, head, cfg = model.model.norm, model.lm_head, model.config
    results: dict[str, Any] = {
        "loops": list(loops),
        "trained_loops": cfg.num_loops,
        "tokens": int(sequences[:, 1:].numel()),
        "training_overlap": training_overlap,
        "warnings": depth_warnings(cfg.num_loops, training_overlap),
        "by_loops": {},
    }
    for message in results["warnings"]:
        warnings.warn(f"depth analysis: {message}", stacklevel=2)
    for t in loops:
        nll, lens_nll = 0.0, torch.zeros(t, dtype=torch.float64)
        # per MoE layer: summed over tokens, one entry per pair of consecutive iterations
        changed: defaultdict[str, torch.Tensor] = defaultdict(partial(torch.zeros, t - 1, dtype=torch.float64))
        jaccard: defaultdict[str, torch.Tensor] = defaultdict(partial(torch.zeros, t - 1, dtype=torch.float64))
        counted: defaultdict[str, int] = defaultdict(int)
        for batch in sequences.split(batch_size):
            batch = batch.to(device)
            targets = batch[:, 1:].reshape(-1)
            out = model(input_ids=batch, num_loops=t, output_hidden_states=True, use_cache=False)
            nll += F.cross_entropy(
                out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]), targets, reduction="sum"
            ).item()
            for k in range(1, t + 1):
                logits = head(norm(out.hidden_states[_boundary_index(cfg, k)]))[:, :-1].float()
                lens_nll[k - 1] += F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets, reduction="sum"
                ).item()
            experts: defaultdict[str, dict[int, torch.Tensor]] = defaultdict(dict)
            for stat in out.router_stats:
                if stat.slot.iteration is not None:
                    experts[stat.slot.layer_name][stat.slot.iteration] = stat.experts
            for layer, per_iteration in experts.items():
                for k in range(1, t):
                    differs, overlap = set_change(per_iteration[k], per_iteration[k - 1])
                    changed[layer][k - 1] += differs.double().sum().item()
                    jaccard[layer][k - 1] += overlap.double().sum().item()
                counted[layer] += per_iteration[0].shape[0]
        n = results["tokens"]
        results["by_loops"][str(t)] = {
            "loss": nll / n,
            "lens_loss": (lens_nll / n).tolist(),
            "routing": {
                layer: {
                    "changed": (changed[layer] / counted[layer]).tolist(),
                    "jaccard": (jaccard[layer] / counted[layer]).tolist(),
                }
                for layer in sorted(counted)
            },
        }
    return results


@dataclass(frozen=True)
class DepthPoint:
    """The held-out loss at ``loops`` iterations and the forward FLOPs per token executed there."""

    loops: int
    loss: float
    flops_per_token: float
    untrained_iteration_vectors: bool  # beyond the trained T an iter_embedding model adds untrained vectors

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DepthPoint:
        return cls(**raw)


@dataclass(frozen=True)
class DepthCurve:
    """``depth_curve``'s result; ``to_dict`` is its JSON (a run's ``eval/depth.json``), key for key."""

    trained_loops: int
    points: list[DepthPoint]
    unrunnable: dict[str, str]  # loop count (as JSON keys it) -> why the model cannot run it
    expert_load: dict[str, list[float]]  # executed slot -> each expert's share of routed tokens, at the trained T

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DepthCurve:
        return cls(
            trained_loops=raw["trained_loops"],
            points=[DepthPoint.from_dict(p) for p in raw["points"]],
            unrunnable=dict(raw["unrunnable"]),
            expert_load=dict(raw["expert_load"]),
        )


@torch.no_grad()
def heldout_loss(
    model, batches: Iterable[torch.Tensor], num_loops: int | None = None, load: dict[str, Any] | None = None
) -> float:
    """Mean of the per-batch LM loss, as the trainer's evaluation computes it (``Trainer.evaluate``).

    ``load``: if given, filled with each executed (layer, iteration) slot's expert load summed over the batches.
    """
    kwargs = {} if num_loops is None else {"num_loops": num_loops}
    losses = []
    for x in batches:
        out = model(input_ids=x, labels=x, use_cache=False, **kwargs)
        losses.append(float(out.lm_loss))
        if load is not None:
            for stat in out.router_stats:
                load[stat.slot.name] = load.get(stat.slot.name, 0) + stat.load
    if not losses:
        raise DataError("no held-out batches to evaluate: the comparison needs --eval-batches >= 1")
    return sum(losses) / len(losses)


def depth_curve(model, batches: list[torch.Tensor], loops: Iterable[int], seq_len: int) -> DepthCurve:
    """Held-out loss and executed forward FLOPs per token at each loop count, and the expert load at the
    trained depth (each expert's share of routed tokens per executed slot).

    A Vanilla MoE is measured at its own depth only. A looped model at its trained T and every count in
    ``loops``; a count the model cannot run is listed under ``unrunnable`` with the reason.
    """
    cfg = model.config
    trained = cfg.num_loops
    wanted = sorted({trained, *loops}) if trained > 1 else [trained]
    points: list[DepthPoint] = []
    unrunnable: dict[str, str] = {}
    load: dict[str, Any] = {}
    for t in wanted:
        try:
            cfg.check_num_loops(t)
        except ValueError as error:
            unrunnable[str(t)] = str(error)
            continue
        points.append(
            DepthPoint(
                loops=t,
                loss=heldout_loss(model, batches, t, load if t == trained else None),
                flops_per_token=compute_budget(cfg, seq_len, num_loops=t).flops_per_token,
                untrained_iteration_vectors=bool(cfg.conditioning.embeds_iteration and t > trained),
            )
        )
    return DepthCurve(trained, points, unrunnable, {k: (v / v.sum()).tolist() for k, v in load.items()})


@torch.no_grad()
def iteration_cosine(model, batches: Iterable[torch.Tensor]) -> dict[str, list[float]]:
    """Per core layer ``core.{j}``: the cosine similarity of its output hidden state between adjacent
    iterations at the trained depth, averaged over every token of ``batches``; entry ``k`` compares
    iteration ``k`` with ``k + 1`` (0-based), so a model trained at T has T - 1 entries per layer. A
    core that converges to a fixed point shows values rising towards 1 across iterations. ``{}`` for a
    Vanilla MoE (nothing is iterated)."""
    cfg = model.config
    loops, prelude, core = cfg.num_loops, cfg.num_prelude_layers, cfg.num_core_layers
    if loops < 2:
        return {}
    sums = torch.zeros(core, loops - 1, dtype=torch.float64)
    count = 0
    for x in batches:
        out = model(input_ids=x, num_loops=loops, output_hidden_states=True, use_cache=False)
        states = out.hidden_states  # [0]: the embeddings; [i + 1]: the output of executed layer i
        for j in range(core):
            for k in range(loops - 1):
                here = states[cache_index("core", j, k, prelude=prelude, core=core, loops=loops) + 1].float()
                after = states[cache_index("core", j, k + 1, prelude=prelude, core=core, loops=loops) + 1].float()
                sums[j, k] += F.cosine_similarity(here, after, dim=-1).double().sum().item()
        count += x.numel()
    if count == 0:
        raise DataError("no held-out batches to measure the iteration cosine on")
    return {f"core.{j}": (sums[j] / count).tolist() for j in range(core)}
