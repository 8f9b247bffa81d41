"""What a run trains (model) and on what (data), behind two swappable factories.

`run_training` only sees these contracts, so tests and experiments can pass their own
factories, and the trainer does not change when the model or data package does.

Data contract (`DataBundle`):
  train        iterable of LongTensor (micro_batch_size, seq_len) for this rank, resumable via
               state_dict()/load_state_dict(); iterating continues from its current position
  val_batches  callable returning a fresh, deterministic iterable of validation batches
  vocab_size   tokenizer vocabulary size (sets the model's vocab_size)
  tokenizer    optional LMTokenizer or transformers tokenizer, exported with the final model
  fingerprints optional {"tokenizer_sha256", "shards_fingerprint"}: stored in each checkpoint, and
               checked by `check_resume_data` before a resumed run touches its data
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from loopmoe.training.config import RunConfig, model_fields


class ResumableLoader(Protocol):
    def __iter__(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class DataBundle:
    train: ResumableLoader
    val_batches: Callable[[], Iterable[torch.Tensor]]
    vocab_size: int
    tokenizer: Any = None
    fingerprints: dict[str, str] | None = None


ModelFactory = Callable[[RunConfig, int], nn.Module]
DataFactory = Callable[[RunConfig, int, int], DataBundle]


def build_model_config(cfg: RunConfig, vocab_size: int) -> Any:
    """The run's LoopMoEConfig at the tokenizer's ``vocab_size``.

    Either ``model.config``, exactly (its vocabulary must be the tokenizer's, so that the stored run
    config describes the model), or preset + explicit `[model]` fields + ``num_loops`` +
    ``vocab_size``: `get_preset` rejects unknown fields with a suggestion, and derives
    loop-dependent defaults (e.g. iteration conditioning) from the final ``num_loops``.
    """
    from loopmoe.config import LoopMoEConfig
    from loopmoe.presets import get_preset

    m = cfg.model
    if m.init_from is not None:
        return _checkpoint_config(m.init_from, m.fields, m.num_loops, vocab_size)
    if m.config is not None:
        if m.config.vocab_size != vocab_size:
            raise ValueError(
                f"model.config has vocab_size {m.config.vocab_size} but the tokenizer has {vocab_size}: "
                f"build the config with vocab_size={vocab_size}"
            )
        return LoopMoEConfig(**model_fields(m.config))
    overrides = {**m.fields, "vocab_size": vocab_size}
    if m.num_loops is not None:
        overrides["num_loops"] = m.num_loops
    if m.preset is None:
        raise ValueError("model.preset is none and no model.config is given: set model.preset (see `loopmoe presets`)")
    return get_preset(m.preset, **overrides)


# Fields a run may set over an init_from checkpoint: they change the training, not the weights' meaning
# (a looped core's weights run at any loop count).
_ADJUSTABLE_OVER_CHECKPOINT = (
    "num_loops",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "router_bias_update_rate",
    "moe_implementation",
)


def _checkpoint_config(folder: str, fields: dict[str, Any], num_loops: int | None, vocab_size: int) -> Any:
    """The architecture of the checkpoint ``folder`` (LoopMoE or Qwen3-MoE), with the explicit ``[model]``
    fields that may differ from it applied; any other explicit field must agree with the checkpoint."""
    from loopmoe.presets import config_from_table, load_model_config

    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"model.init_from = {folder!r}: no config.json there; give a checkpoint folder")
    saved = load_model_config(folder)
    asked = {**fields, **({} if num_loops is None else {"num_loops": num_loops})}
    wanted = config_from_table({**model_fields(saved), **asked}, "model.init_from")  # unknown keys fail here
    contradictions = [
        f"model.{key} = {getattr(wanted, key)!r} (the checkpoint has {getattr(saved, key)!r})"
        for key in asked
        if key not in _ADJUSTABLE_OVER_CHECKPOINT and getattr(wanted, key) != getattr(saved, key)
    ]
    if contradictions:
        raise ValueError(
            f"model.init_from = {folder!r} fixes the architecture, but the run config asks for "
            f"{'; '.join(contradictions)}: drop these keys (only {', '.join(_ADJUSTABLE_OVER_CHECKPOINT)} "
            "may differ from the checkpoint)"
        )
    if saved.vocab_size != vocab_size:
        raise ValueError(
            f"model.init_from = {folder!r} has a {saved.vocab_size}-token vocabulary but the run's tokenizer has "
            f"{vocab_size}: train with the checkpoint's tokenizer (data.tokenizer = {folder!r})"
        )
    return wanted


def load_initial_weights(model: nn.Module, folder: str | Path) -> None:
    """Load the weights of the LoopMoE or Qwen3-MoE checkpoint ``folder`` into ``model`` (built from its config).

    Read with safetensors (nothing in the folder is executed); every parameter must be covered.
    """
    from loopmoe.convert.qwen3_moe import qwen3_moe_state_dict_to_loopmoe, read_weights
    from loopmoe.evaluation.loading import check_safetensors

    folder = Path(folder)
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights)
    state = read_weights(folder)
    if json.loads((folder / "config.json").read_text()).get("model_type") == "qwen3_moe":
        state = qwen3_moe_state_dict_to_loopmoe(state, model.config)  # type: ignore[arg-type]  # a LoopMoEForCausalLM
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not k.endswith("expert_bias") and not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"model.init_from = {str(folder)!r}: its weights do not fit the model built from its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); the checkpoint is damaged or not LoopMoE / Qwen3-MoE"
        )


def default_model_factory(cfg: RunConfig, vocab_size: int) -> nn.Module:
    from loopmoe.model import LoopMoEForCausalLM

    model = LoopMoEForCausalLM(build_model_config(cfg, vocab_size))
    if cfg.model.init_from is not None:
        load_initial_weights(model, cfg.model.init_from)
    return model


def resolve_source(spec: str) -> str:
    """A corpus name like `tinyshakespeare` means that folder of the shared data directory."""
    from loopmoe.paths import shared_data_dir

    if spec == "embedded" or spec.startswith("hf:") or Path(spec).expanduser().exists():
        return spec
    shared = shared_data_dir()
    if shared is not None and (shared / spec).exists():
        return str(shared / spec)
    raise ValueError(
        f"data.source = {spec!r} is neither a path, 'embedded', 'hf:NAME', nor a folder of the shared "
        f"data directory ({shared}); set LOOPMOE_DATA_DIR or give a path"
    )


def _tokenizer(cfg: RunConfig, source: Any, data_dir: Path) -> Any:
    from loopmoe.data import load_tokenizer, train_bpe_tokenizer
    from loopmoe.paths import shared_data_dir

    d = cfg.data
    if d.tokenizer is not None:
        path = Path(d.tokenizer).expanduser()
        shared = shared_data_dir()
        if not path.exists() and shared is not None and (shared / "tokenizers" / d.tokenizer).exists():
            path = shared / "tokenizers" / d.tokenizer
        return load_tokenizer(path)
    if d.train_bpe_vocab is not None:
        return train_bpe_tokenizer(source, d.train_bpe_vocab, data_dir / "tokenizer")
    raise ValueError(
        "set data.tokenizer (a path, or a name under the shared tokenizers folder, e.g. 'gpt2') "
        "or data.train_bpe_vocab (train a BPE of that size on the source)"
    )


class DataChangedError(ValueError):
    """The data a checkpoint was trained on differs from what the run config gives now; ``why`` says how."""

    def __init__(self, why: str, message: str):
        super().__init__(message)
        self.why = why


def _current_data_fingerprints(cfg: RunConfig, source: Any, data_dir: Path) -> tuple[dict[str, str] | None, str]:
    """The fingerprints the data factory would produce now, computed without writing anything.

    Returns (fingerprints, why): fingerprints is None when the tokenizer would be (re)trained.
    """
    from loopmoe.data.shards import shards_fingerprint
    from loopmoe.data.tokenizer import tokenizer_is_current

    d = cfg.data
    if (
        d.tokenizer is None
        and d.train_bpe_vocab is not None
        and not tokenizer_is_current(source, d.train_bpe_vocab, data_dir / "tokenizer")
    ):
        if not (data_dir / "tokenizer").exists():
            return None, f"the BPE tokenizer in {data_dir / 'tokenizer'} is missing and would be retrained"
        return None, "the corpus or data.train_bpe_vocab changed, so the BPE tokenizer would be retrained"
    tokenizer = _tokenizer(cfg, source, data_dir)
    return {
        "tokenizer_sha256": tokenizer.content_hash(),
        "shards_fingerprint": shards_fingerprint(source, tokenizer, d.val_fraction),
    }, ""


def check_resume_data(cfg: RunConfig, saved: dict[str, str], *, rebuild: bool, step: int) -> bool:
    """Before a resumed run touches its data: is it the data checkpoint ``step`` was trained on? Reads only.

    Unchanged: returns False. Changed and not ``rebuild``: ValueError saying what changed and how to
    proceed. Changed and ``rebuild``: returns True; then call `move_data_aside` (on one rank).
    """
    from loopmoe.data import open_source

    if cfg.data.data_dir is None:
        return False
    data_dir = Path(cfg.data.data_dir)
    source = open_source(resolve_source(cfg.data.source))
    current, why = _current_data_fingerprints(cfg, source, data_dir)
    if current is not None and current.get("tokenizer_sha256") != saved.get("tokenizer_sha256"):
        why = "the tokenizer changed"
    elif current is not None and current.get("shards_fingerprint") != saved.get("shards_fingerprint"):
        why = "the corpus (its contents) or data.val_fraction changed"
    elif current is not None:
        return False
    if not rebuild:
        raise DataChangedError(
            why,
            f"cannot resume: checkpoint step {step} was trained on other data than data.source = "
            f"{cfg.data.source!r} gives now ({why}); nothing was changed. Restore the corpus and tokenizer the "
            "run was trained on, or rebuild the data and continue the run on the new data with --rebuild-data "
            f"(the old data is kept in {data_dir}/*.step{step}), or train into a new --out",
        )
    return True


def move_data_aside(cfg: RunConfig, step: int) -> None:
    """Rename DATA_DIR/tokenizer and DATA_DIR/shards to ``<name>.step<N>`` (never deleted) before a rebuild."""
    if cfg.data.data_dir is None:
        return
    data_dir = Path(cfg.data.data_dir)
    for name in ("tokenizer", "shards"):
        old = data_dir / name
        if old.exists():
            aside = data_dir / f"{name}.step{step}"
            n = 1
            while aside.exists():
                aside, n = data_dir / f"{name}.step{step}.{n}", n + 1
            old.rename(aside)


def default_data_factory(cfg: RunConfig, rank: int, world_size: int) -> DataBundle:
    """Corpus -> tokenizer -> shards -> this rank's resumable loader, through `loopmoe.data`.

    Rank 0 trains the tokenizer and writes the shards (both reused when current); the other
    ranks wait at a barrier and then open them.
    """
    from loopmoe.data import (
        TokenBatchLoader,
        load_shards,
        load_tokenizer,
        open_source,
        prepare_shards,
        validation_batches,
    )
    from loopmoe.distributed.env import barrier

    d, t = cfg.data, cfg.train
    if d.data_dir is None:
        raise ValueError("data.data_dir is not set; run_training sets it to OUT_DIR/data, or set it in [data]")
    data_dir = Path(d.data_dir)
    source = open_source(resolve_source(d.source))
    if rank == 0:
        tokenizer = _tokenizer(cfg, source, data_dir)
        shards = prepare_shards(source, tokenizer, data_dir / "shards", val_fraction=d.val_fraction)
    barrier()
    if rank != 0:
        tokenizer = load_tokenizer(data_dir / "tokenizer") if d.tokenizer is None else _tokenizer(cfg, source, data_dir)
        shards = load_shards(data_dir / "shards")
    loader = TokenBatchLoader(
        shards.tokens("train"),
        batch_size=t.micro_batch_size,
        seq_len=d.seq_len,
        seed=t.seed,
        rank=rank,
        world_size=world_size,
    )

    val_tokens = len(shards.tokens("val"))
    if t.eval_batches and val_tokens // d.seq_len < t.micro_batch_size * world_size:
        need = t.micro_batch_size * world_size * d.seq_len
        raise ValueError(
            f"the validation split has {val_tokens} tokens, fewer than one evaluation batch of "
            f"{t.micro_batch_size * world_size} x {d.seq_len} = {need} (train.micro_batch_size x processes x "
            "data.seq_len): raise data.val_fraction, lower train.micro_batch_size or data.seq_len, use more data, "
            "or set train.eval_batches=0 to train without evaluation"
        )

    def val_batches() -> Iterable[torch.Tensor]:
        return validation_batches(
            shards.tokens("val"),
            batch_size=t.micro_batch_size,
            seq_len=d.seq_len,
            num_batches=t.eval_batches,
            rank=rank,
            world_size=world_size,
        )

    return DataBundle(
        train=loader,
        val_batches=val_batches,
        vocab_size=tokenizer.vocab_size,
        tokenizer=tokenizer,
        fingerprints={"tokenizer_sha256": tokenizer.content_hash(), "shards_fingerprint": shards.meta.fingerprint},
    )
