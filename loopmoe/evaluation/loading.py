"""Load any causal-LM checkpoint directory (LoopMoE or plain transformers) and its tokenizer, offline."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_model(model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None):
    """``AutoModelForCausalLM`` from a local directory in eval mode (``import loopmoe`` registers LoopMoE)."""
    from transformers import AutoModelForCausalLM

    import loopmoe  # noqa: F401  (registers the LoopMoE Auto classes)

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory: expected {model_dir / 'config.json'}")
    for weights in sorted(model_dir.glob("*.safetensors")):
        check_safetensors(weights)
    with no_remote_code(model_dir / "config.json"):
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False, dtype=dtype if dtype is not None else "auto"
        )
    return model.to(device).eval()  # type: ignore[arg-type]  # transformers: .to is typed as wraps(nn.Module.to), its self as the first argument


def check_safetensors(path: Path) -> None:
    """Raise ValueError naming ``path`` if it is not a complete safetensors file (header + every tensor's bytes).

    Reads only the header: a file cut short (interrupted copy or export) is caught before transformers
    or safetensors fail on it with an internal error.
    """
    import json
    import struct

    size = path.stat().st_size
    problem = None
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                problem = f"it has {size} bytes, fewer than a header"
            else:
                (length,) = struct.unpack("<Q", raw)
                if 8 + length > size:
                    problem = f"its header needs {8 + length} bytes but the file has {size}"
                else:
                    header = json.loads(handle.read(length))
                    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
                    if 8 + length + end > size:
                        problem = f"its tensors need {8 + length + end} bytes but the file has {size}"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        problem = f"its header is unreadable ({type(error).__name__}: {error})"
    if problem:
        raise ValueError(f"weights file {path} is truncated or corrupt: {problem}; copy or export the model again")


def load_hf_tokenizer(model_dir: str | Path, tokenizer: str | Path | None = None):
    """The tokenizer saved with the model, or ``tokenizer`` (a tokenizer.json file or an HF tokenizer dir)."""
    from transformers import AutoTokenizer

    source = Path(tokenizer) if tokenizer is not None else Path(model_dir)
    if source.is_file():
        from loopmoe.data import load_tokenizer

        return load_tokenizer(source).to_transformers()
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {source} (looked for {', '.join(TOKENIZER_FILES)}): pass --tokenizer PATH, a "
            "tokenizer.json file or a tokenizer directory"
        )
    with no_remote_code(source / "tokenizer_config.json"):
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)


@contextmanager
def no_remote_code(config: Path) -> Iterator[None]:
    """Turn transformers' refusal of a folder's own code (``auto_map``, trust_remote_code=False) into a clear error."""
    try:
        yield
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        where = " or ".join(dict.fromkeys([config.name, "config.json"]))
        raise ValueError(
            f"{config.parent} asks to run its own Python (an auto_map in {where} names custom code for a model or "
            "tokenizer type transformers does not know); loopmoe never runs code from a model or tokenizer "
            "folder: use a LoopMoE or a transformers-native checkpoint"
        ) from None


def is_looped(model) -> bool:
    """Whether the model takes ``num_loops=`` (a LoopMoE), so test-time depth can be changed."""
    return getattr(model.config, "model_type", None) == "loopmoe"


def require_looped(model, what: str) -> None:
    """Raise a clear error when ``what`` (a LoopMoE-only feature) is asked of another model type."""
    if not is_looped(model):
        raise ValueError(f"{what} needs a LoopMoE checkpoint; this model is {model.config.model_type!r}")


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
    model.config.num_loops = num_loops
    try:
        yield
    finally:
        model.config.num_loops = trained
