"""Load any causal-LM checkpoint directory (LoopMoE or plain transformers) and its tokenizer, offline."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from loopmoe.errors import ConfigError, DataError, LoopMoEError, MissingFileError
from loopmoe.trust import check_safetensors, no_remote_code

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_model(model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None):
    """``AutoModelForCausalLM`` from a local directory in eval mode (``import loopmoe`` registers LoopMoE)."""
    from transformers import AutoModelForCausalLM

    import loopmoe  # noqa: F401  (registers the LoopMoE Auto classes)

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise MissingFileError(f"{model_dir} is not a model directory: expected {model_dir / 'config.json'}")
    for weights in sorted(model_dir.glob("*.safetensors")):
        check_safetensors(weights)
    with no_remote_code(model_dir / "config.json"):
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False, dtype=dtype if dtype is not None else "auto"
        )
    return model.to(device).eval()  # type: ignore[arg-type]  # transformers: .to is typed as wraps(nn.Module.to), its self as the first argument


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
