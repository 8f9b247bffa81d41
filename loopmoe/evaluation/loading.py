"""Load any causal-LM checkpoint directory (LoopMoE or plain transformers) and its tokenizer, offline."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from loopmoe.errors import CheckpointError, ConfigError, DataError, LoopMoEError, MissingFileError
from loopmoe.trust import check_safetensors, no_remote_code, pickle_refusal, read_json, refuse_mismatched_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_model(model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None):
    """``AutoModelForCausalLM`` from a local directory in eval mode (``import loopmoe`` registers LoopMoE)."""
    from transformers import AutoModelForCausalLM

    import loopmoe  # noqa: F401  (registers the LoopMoE Auto classes)

    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise MissingFileError(f"{model_dir} is not a model directory: expected {config_path}")
    fix = "copy or export the checkpoint again"
    if not isinstance(read_json(config_path, CheckpointError, fix).get("model_type"), str):
        raise CheckpointError(f"{config_path} names no model_type: it is not a transformers model config; {fix}")
    for weights in sorted(model_dir.glob("*.safetensors")):
        check_safetensors(weights)
    with no_remote_code(config_path), _quiet_transformers():
        try:
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                str(model_dir),
                local_files_only=True,
                trust_remote_code=False,
                dtype=dtype if dtype is not None else "auto",
                output_loading_info=True,
                ignore_mismatched_sizes=True,  # reported below in one line, instead of transformers' table
            )
        except LoopMoEError:
            raise
        except pickle.UnpicklingError as e:  # torch's weights_only unpickler refused a .bin: nothing ran
            raise pickle_refusal(next(iter(sorted(model_dir.glob("*.bin"))), model_dir), e) from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
            if "trust_remote_code" in str(e):
                raise  # no_remote_code names it
            raise CheckpointError(
                f"{model_dir} cannot be loaded as a causal LM ({type(e).__name__}: "
                f"{next((x for x in str(e).splitlines() if x.strip()), '')[:300]}); {fix}"
            ) from e
    model, info = loaded  # output_loading_info: (model, {missing_keys, unexpected_keys, mismatched_keys, ...})
    check_loading_info(model_dir, info)
    return model.to(device).eval()


def check_loading_info(model_dir: Path, info: dict) -> None:
    """Refuse weights that leave a parameter of the model at its random initialisation: a missing tensor
    or one of another shape (transformers only warns, and would generate from random weights)."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("expert_bias"))
    wrong = sorted(
        f"{k} {tuple(saved)} (expected {tuple(wanted)})" for k, saved, wanted in info.get("mismatched_keys", ())
    )
    refuse_mismatched_weights(model_dir, missing, wrong)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' loading report (a table of keys) is replaced by ``check_loading_info``'s one line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_hf_tokenizer(model_dir: str | Path, tokenizer: str | Path | None = None):
    """The tokenizer saved with the model, or ``tokenizer`` (a tokenizer.json file or an HF tokenizer dir)."""
    from transformers import AutoTokenizer

    source = Path(tokenizer) if tokenizer is not None else Path(model_dir)
    if source.is_file():
        from loopmoe.data import load_tokenizer  # lazy: data pulls in tokenizers and the shard store

        try:
            return load_tokenizer(source).to_transformers()
        except LoopMoEError:
            raise
        except Exception as e:  # the tokenizers library's own parse errors (a JSON that is no tokenizer)
            raise DataError(
                f"{source} is not a tokenizer.json the tokenizers library can read ({type(e).__name__}: {e}); "
                "pass --tokenizer with a tokenizer.json file or a tokenizer folder"
            ) from None
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        raise MissingFileError(
            f"no tokenizer in {source} (looked for {', '.join(TOKENIZER_FILES)}): pass --tokenizer PATH, a "
            "tokenizer.json file or a tokenizer directory"
        )
    with no_remote_code(source / "tokenizer_config.json"):
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)


def is_looped(model) -> bool:
    """Whether the model takes ``num_loops=`` (a LoopMoE), so test-time depth can be changed."""
    return getattr(model.config, "model_type", None) == "loopmoe"


def require_looped(model, what: str) -> None:
    """Raise a clear error when ``what`` (a LoopMoE-only feature) is asked of another model type."""
    if not is_looped(model):
        raise ConfigError(f"{what} needs a LoopMoE checkpoint; this model is {model.config.model_type!r}")


@contextmanager
def test_time_depth(model, num_loops: int | None) -> Iterator[None]:
    """Run the looped core ``num_loops`` times in every forward inside the block (None: as trained).

    lm-eval calls ``model(input_ids)`` itself, so the loop count is set as the config default that
    LoopMoE's forward falls back to, and restored afterwards.
    """
    if num_loops is None:
        yield
        return
    require_looped(model, "--num-loops")
    model.config.check_num_loops(num_loops)
    trained = model.config.num_loops
    if trained == 1 and num_loops != 1:
        warnings.warn(
            f"num_loops={num_loops} loops a checkpoint trained with num_loops=1 (a Vanilla MoE, no iteration "
            "conditioning): its layers were never trained to run repeatedly, so expect its quality to fall",
            stacklevel=3,
        )
    elif num_loops > model.config.max_loops:
        warnings.warn(
            f"num_loops={num_loops} exceeds the checkpoint's max_loops={model.config.max_loops}: test-time depth "
            f"beyond it runs (iteration encodings are sinusoidal), but it was trained at {trained}",
            stacklevel=3,
        )
    model.config.num_loops = num_loops
    try:
        yield
    finally:
        model.config.num_loops = trained
