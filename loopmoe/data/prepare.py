"""``prepare_data``: a ``[data]`` section -> its tokenizer and token shards, cached in ``data.data_dir``.

The one path from settings to prepared data, used by training and by ``loopmoe compare``; neither
needs a whole run config. ``check_resume_data`` (read-only) tells whether the data a checkpoint was
trained on is still what the settings give, before anything is rebuilt; ``move_data_aside`` keeps
the old data (never deleted) when a run continues on rebuilt data.

The layout of ``data.data_dir``: ``tokenizer/`` (a trained BPE; absent with ``data.tokenizer``)
and ``shards/`` (``loopmoe.data.shards``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from loopmoe.data.config import DataSection
from loopmoe.data.shards import TokenShards, load_shards, prepare_shards, shards_fingerprint
from loopmoe.data.sources import DataSource, open_source
from loopmoe.data.tokenizer import LMTokenizer, load_tokenizer, tokenizer_is_current, train_bpe_tokenizer
from loopmoe.errors import ConfigError, DataError
from loopmoe.paths import shared_data_dir


@dataclass(frozen=True)
class PreparedData:
    """The tokenizer and token shards of a ``[data]`` section."""

    tokenizer: LMTokenizer
    shards: TokenShards

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def fingerprints(self) -> dict[str, str]:
        """What a checkpoint stores of its data, and ``check_resume_data`` compares."""
        return {"tokenizer_sha256": self.tokenizer.content_hash(), "shards_fingerprint": self.shards.meta.fingerprint}


class DataChangedError(DataError):
    """The data a checkpoint was trained on differs from what the settings give now; ``why`` says how."""

    def __init__(self, why: str, message: str):
        super().__init__(message)
        self.why = why


def resolve_source(spec: str) -> str:
    """A corpus name like `tinyshakespeare` means that folder of the shared data directory."""
    if spec == "embedded" or spec.startswith("hf:") or Path(spec).expanduser().exists():
        return spec
    shared = shared_data_dir()
    if shared is not None and (shared / spec).exists():
        return str(shared / spec)
    raise ConfigError(
        f"data.source = {spec!r} is neither a path, 'embedded', 'hf:NAME', nor a folder of the shared "
        f"data directory ({shared}); set LOOPMOE_DATA_DIR or give a path"
    )


def _data_dir(data: DataSection) -> Path:
    if data.data_dir is None:
        raise ConfigError("data.data_dir is not set; run_training sets it to OUT_DIR/data, or set it in [data]")
    return Path(data.data_dir)


def _tokenizer(data: DataSection, source: DataSource, data_dir: Path) -> LMTokenizer:
    """``data.tokenizer`` loaded, or the BPE of ``data.train_bpe_vocab`` trained on the source (reused when current)."""
    if data.tokenizer is not None:
        path = Path(data.tokenizer).expanduser()
        shared = shared_data_dir()
        if not path.exists() and shared is not None and (shared / "tokenizers" / data.tokenizer).exists():
            path = shared / "tokenizers" / data.tokenizer
        return load_tokenizer(path)
    if data.train_bpe_vocab is not None:
        return train_bpe_tokenizer(source, data.train_bpe_vocab, data_dir / "tokenizer")
    raise ConfigError(
        "set data.tokenizer (a path, or a name under the shared tokenizers folder, e.g. 'gpt2') "
        "or data.train_bpe_vocab (train a BPE of that size on the source)"
    )


def prepare_data(data: DataSection, *, write: bool = True) -> PreparedData:
    """The tokenizer and shards of ``data`` in ``data.data_dir``.

    ``write`` (one process): train the tokenizer and tokenise the corpus, or reuse both where they
    are current. ``write=False`` (the other processes of a run, after the writer): open what the
    writer prepared.
    """
    data_dir = _data_dir(data)
    source = open_source(resolve_source(data.source))
    if write:
        tokenizer = _tokenizer(data, source, data_dir)
        return PreparedData(
            tokenizer, prepare_shards(source, tokenizer, data_dir / "shards", val_fraction=data.val_fraction)
        )
    tokenizer = load_tokenizer(data_dir / "tokenizer") if data.tokenizer is None else _tokenizer(data, source, data_dir)
    return PreparedData(tokenizer, load_shards(data_dir / "shards"))


def _current_fingerprints(data: DataSection, source: DataSource, data_dir: Path) -> tuple[dict[str, str] | None, str]:
    """The fingerprints ``prepare_data`` would produce now, computed without writing anything.

    Returns (fingerprints, why): fingerprints is None when the tokenizer would be (re)trained.
    """
    if (
        data.tokenizer is None
        and data.train_bpe_vocab is not None
        and not tokenizer_is_current(source, data.train_bpe_vocab, data_dir / "tokenizer")
    ):
        if not (data_dir / "tokenizer").exists():
            return None, f"the BPE tokenizer in {data_dir / 'tokenizer'} is missing and would be retrained"
        return None, "the corpus or data.train_bpe_vocab changed, so the BPE tokenizer would be retrained"
    tokenizer = _tokenizer(data, source, data_dir)
    current = {
        "tokenizer_sha256": tokenizer.content_hash(),
        "shards_fingerprint": shards_fingerprint(source, tokenizer, data.val_fraction),
    }
    # A checkpoint of older loopmoe holds the fingerprint that also hashed the corpus path: the one the
    # shard folder records beside it (the same bytes, reached through another path, are the same data).
    recorded = _recorded_source(data_dir / "shards")
    if recorded is not None:
        current["legacy_shards_fingerprint"] = shards_fingerprint(
            source, tokenizer, data.val_fraction, legacy_spec=recorded
        )
    return current, ""


def _recorded_source(shards_dir: Path) -> str | None:
    """The source path a shard folder's meta.json records (None if there is none)."""
    try:
        recorded = json.loads((shards_dir / "meta.json").read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, str) else None


def check_resume_data(data: DataSection, saved: Mapping[str, str], *, rebuild: bool, step: int) -> bool:
    """Before a resumed run touches its data: is it the data checkpoint ``step`` was trained on? Reads only.

    ``saved``: the checkpoint's fingerprints (``PreparedData.fingerprints``). Unchanged: returns False.
    Changed and not ``rebuild``: DataChangedError saying what changed and how to proceed. Changed and
    ``rebuild``: returns True; then call `move_data_aside` (in one process).
    """
    if data.data_dir is None:
        return False
    data_dir = Path(data.data_dir)
    source = open_source(resolve_source(data.source))
    current, why = _current_fingerprints(data, source, data_dir)
    if current is not None and current.get("tokenizer_sha256") != saved.get("tokenizer_sha256"):
        why = "the tokenizer changed"
    elif current is not None and saved.get("shards_fingerprint") not in (
        current.get("shards_fingerprint"),
        current.get("legacy_shards_fingerprint"),
    ):
        why = "the corpus (its contents) or data.val_fraction changed"
    elif current is not None:
        return False
    if not rebuild:
        raise DataChangedError(
            why,
            f"cannot resume: checkpoint step {step} was trained on other data than data.source = "
            f"{data.source!r} gives now ({why}); nothing was changed. Restore the corpus and tokenizer the "
            "run was trained on, or rebuild the data and continue the run on the new data with --rebuild-data "
            f"(the old data is kept in {data_dir}/*.step{step}), or train into a new --out",
        )
    return True


def move_data_aside(data: DataSection, step: int) -> None:
    """Rename DATA_DIR/tokenizer and DATA_DIR/shards to ``<name>.step<N>`` (never deleted) before a rebuild."""
    if data.data_dir is None:
        return
    data_dir = Path(data.data_dir)
    for name in ("tokenizer", "shards"):
        old = data_dir / name
        if old.exists():
            aside = data_dir / f"{name}.step{step}"
            n = 1
            while aside.exists():
                aside, n = data_dir / f"{name}.step{step}.{n}", n + 1
            old.rename(aside)
