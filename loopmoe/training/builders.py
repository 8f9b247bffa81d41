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
               checked by `loopmoe.data.prepare.check_resume_data` before a resumed run touches its data

The default data factory is `loopmoe.data.prepare_data` (tokenizer and shards of `[data]`) with this
rank's loader over them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from loopmoe.config import LoopMoEConfig
from loopmoe.convert.qwen3_moe import qwen3_moe_state_dict_to_loopmoe, read_weights
from loopmoe.data import TokenBatchLoader, validation_batches
from loopmoe.data.prepare import prepare_data
from loopmoe.distributed.env import collective_stage
from loopmoe.errors import CheckpointError, ConfigError, MissingFileError
from loopmoe.model import LoopMoEForCausalLM
from loopmoe.presets import config_from_table, get_preset, load_model_config
from loopmoe.training.config import RunConfig, model_fields
from loopmoe.trust import check_safetensors


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
    m = cfg.model
    if m.init_from is not None:
        return _checkpoint_config(m.init_from, m.fields, m.num_loops, vocab_size)
    if m.config is not None:
        if m.config.vocab_size != vocab_size:
            raise ConfigError(
                f"model.config has vocab_size {m.config.vocab_size} but the tokenizer has {vocab_size}: "
                f"build the config with vocab_size={vocab_size}"
            )
        return LoopMoEConfig(**model_fields(m.config))
    overrides = {**m.fields, "vocab_size": vocab_size}
    if m.num_loops is not None:
        overrides["num_loops"] = m.num_loops
    if m.preset is None:
        raise ConfigError("model.preset is none and no model.config is given: set model.preset (see `loopmoe presets`)")
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
    if not (Path(folder) / "config.json").is_file():
        raise MissingFileError(f"model.init_from = {folder!r}: no config.json there; give a checkpoint folder")
    saved = load_model_config(folder)
    asked = {**fields, **({} if num_loops is None else {"num_loops": num_loops})}
    wanted = config_from_table({**model_fields(saved), **asked}, "model.init_from")  # unknown keys fail here
    contradictions = [
        f"model.{key} = {getattr(wanted, key)!r} (the checkpoint has {getattr(saved, key)!r})"
        for key in asked
        if key not in _ADJUSTABLE_OVER_CHECKPOINT and getattr(wanted, key) != getattr(saved, key)
    ]
    if contradictions:
        raise ConfigError(
            f"model.init_from = {folder!r} fixes the architecture, but the run config asks for "
            f"{'; '.join(contradictions)}: drop these keys (only {', '.join(_ADJUSTABLE_OVER_CHECKPOINT)} "
            "may differ from the checkpoint)"
        )
    if saved.vocab_size != vocab_size:
        raise ConfigError(
            f"model.init_from = {folder!r} has a {saved.vocab_size}-token vocabulary but the run's tokenizer has "
            f"{vocab_size}: train with the checkpoint's tokenizer (data.tokenizer = {folder!r})"
        )
    return wanted


def load_initial_weights(model: nn.Module, folder: str | Path) -> None:
    """Load the weights of the LoopMoE or Qwen3-MoE checkpoint ``folder`` into ``model`` (built from its config).

    Read with safetensors (nothing in the folder is executed); every parameter must be covered.
    """
    folder = Path(folder)
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights)
    state = read_weights(folder)
    if json.loads((folder / "config.json").read_text()).get("model_type") == "qwen3_moe":
        state = qwen3_moe_state_dict_to_loopmoe(state, model.config)  # type: ignore[arg-type]  # a LoopMoEForCausalLM
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} (the model needs {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong:
        raise CheckpointError(
            f"model.init_from = {str(folder)!r}: {len(wrong)} tensor(s) have other shapes than its config.json "
            f"gives ({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''}): the weights do not match their "
            "config; export or copy the checkpoint again, or point model.init_from at a checkpoint whose weights "
            "and config.json belong together"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not k.endswith("expert_bias") and not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"model.init_from = {str(folder)!r}: its weights do not fit the model built from its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); the checkpoint is damaged or not LoopMoE / Qwen3-MoE"
        )


def planned_vocab_size(cfg: RunConfig) -> tuple[int, str]:
    """The vocabulary the run will have before its tokenizer exists, and where it comes from (a note)."""
    if cfg.model.config is not None:
        return cfg.model.config.vocab_size, " of model.config"
    if cfg.data.train_bpe_vocab:
        return cfg.data.train_bpe_vocab, ""
    assert cfg.model.preset is not None  # RunConfig.validate
    return get_preset(cfg.model.preset).vocab_size, " from the preset; the tokenizer sets it"


def default_model_factory(cfg: RunConfig, vocab_size: int) -> nn.Module:
    model = LoopMoEForCausalLM(build_model_config(cfg, vocab_size))
    if cfg.model.init_from is not None:
        load_initial_weights(model, cfg.model.init_from)
    return model


def default_data_factory(cfg: RunConfig, rank: int, world_size: int) -> DataBundle:
    """Corpus -> tokenizer -> shards (`prepare_data`) -> this rank's resumable loader.

    Rank 0 trains the tokenizer and writes the shards (both reused when current); the other
    ranks wait at a barrier and then open them.
    """
    d, t = cfg.data, cfg.train
    with collective_stage("building the tokenizer and shards"):  # the others wait here, and learn if it failed
        if rank == 0:
            prepared = prepare_data(d)
    if rank != 0:
        prepared = prepare_data(d, write=False)
    loader = TokenBatchLoader(
        prepared.shards.tokens("train"),
        batch_size=t.micro_batch_size,
        seq_len=d.seq_len,
        seed=t.seed,
        rank=rank,
        world_size=world_size,
    )

    val_tokens = len(prepared.shards.tokens("val"))
    if t.eval_batches and val_tokens // d.seq_len < t.micro_batch_size * world_size:
        need = t.micro_batch_size * world_size * d.seq_len
        raise ConfigError(
            f"the validation split has {val_tokens} tokens, fewer than one evaluation batch of "
            f"{t.micro_batch_size * world_size} x {d.seq_len} = {need} (train.micro_batch_size x processes x "
            "data.seq_len): raise data.val_fraction, lower train.micro_batch_size or data.seq_len, use more data, "
            "or set train.eval_batches=0 to train without evaluation"
        )

    def val_batches() -> Iterable[torch.Tensor]:
        return validation_batches(
            prepared.shards.tokens("val"),
            batch_size=t.micro_batch_size,
            seq_len=d.seq_len,
            num_batches=t.eval_batches,
            rank=rank,
            world_size=world_size,
        )

    return DataBundle(
        train=loader,
        val_batches=val_batches,
        vocab_size=prepared.vocab_size,
        tokenizer=prepared.tokenizer,
        fingerprints=prepared.fingerprints,
    )
