"""What loopmoe agrees to read: no code from a model or tokenizer folder, only whole safetensors files.

Every path that opens a folder a user points at (evaluation, data, init_from, export) goes through
these two checks, so the rule has one home on the ground floor.
"""

from __future__ import annotations

import json
import struct
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loopmoe.errors import CheckpointError, ConfigError, DataError, LoopMoEError


@contextmanager
def no_remote_code(config: Path) -> Iterator[None]:
    """Turn transformers' refusal of a folder's own code (``auto_map``, trust_remote_code=False) into a clear error."""
    try:
        yield
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        where = " or ".join(dict.fromkeys([config.name, "config.json"]))
        raise CheckpointError(
            f"{config.parent} asks to run its own Python (an auto_map in {where} names custom code for a model or "
            "tokenizer type transformers does not know); loopmoe never runs code from a model or tokenizer "
            "folder: use a LoopMoE or a transformers-native checkpoint"
        ) from None


def check_safetensors(path: Path) -> None:
    """Raise ValueError naming ``path`` if it is not a complete safetensors file (header + every tensor's bytes).

    Reads only the header: a file cut short (interrupted copy or export) is caught before transformers
    or safetensors fail on it with an internal error.
    """
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
        raise CheckpointError(f"weights file {path} is truncated or corrupt: {problem}; copy or export the model again")


def pickle_refusal(file: Path, error: BaseException) -> CheckpointError:
    """The one-line refusal of a pickled weights file (``.bin`` / ``.pt``) that torch's restricted
    unpickler (``weights_only=True``) rejected: it holds more than plain tensors, and loading it
    without the restriction would run code from the file. Names what was refused, never the unsafe way out."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if "Unsupported" in line), None)
    detail = detail or next((line for line in lines if "WeightsUnpickler" in line), type(error).__name__)
    return CheckpointError(
        f"{file}: refused: pickled weights that are not plain tensors ({detail[:200]}; loading them could run "
        "code from the file); use a safetensors checkpoint, or convert them to safetensors with a tool you trust"
    )


def unreadable_weights(file: Path, error: BaseException) -> CheckpointError:
    """A weights file safetensors or torch cannot parse (torn, not a checkpoint), named in one line."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return CheckpointError(
        f"weights file {file} is unreadable ({type(error).__name__}: {first[:200]}); copy or export the model again"
    )


def read_json(
    path: Path, error: type[LoopMoEError] = DataError, fix: str = "fix or replace the file"
) -> dict[str, Any]:
    """The JSON object at ``path``; a torn, hand-broken or non-object file is ``error`` naming the file and ``fix``."""
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def read_toml(path: Path, error: type[LoopMoEError] = ConfigError, fix: str = "fix the file") -> dict[str, Any]:
    """The TOML table at ``path``; a syntax error is ``error`` naming the file, the line and ``fix``."""
    try:
        return tomllib.loads(Path(path).read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid TOML ({e}); {fix}") from None


def refuse_mismatched_weights(where: Path | str, missing: list[str], wrong: list[str]) -> None:
    """Refuse weights that miss tensors (``missing``: names) or hold others of the wrong shape (``wrong``:
    ``"name (saved) (expected ...)"``): one message for every reader (convert, export, eval, generate)."""
    if not missing and not wrong:
        return
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if wrong:
        parts.append(f"wrong shapes: {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    raise CheckpointError(
        f"{where}: the weights do not match its config.json ({'; '.join(parts)}); copy or export the checkpoint again"
    )
