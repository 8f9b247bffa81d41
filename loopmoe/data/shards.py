"""Tokenise a corpus once into memory-mapped token files, and reuse them.

Layout of a shard folder::

    meta.json   format version, fingerprint, dtype, vocab size, eos id, counts, sha256 of each .bin
    train.bin   flat array of token ids (dtype from meta), each document + EOS
    val.bin     the same for the held-out documents

Tokens are stored as uint16 when every id fits (vocab_size <= 65536), else
uint32, halving disk and page-cache use for the usual vocabularies.

Validation split: document ``i`` (0-based, in source order) is held out iff
``floor((i + 1) * f) > floor(i * f)`` with ``f = val_fraction``: exactly a fraction
``f`` of documents, spread evenly through the corpus, decided while streaming.

The fingerprint hashes the source identity (the sha256 of the corpus files' bytes
and names, or the dataset fingerprint, and the reader options; not the path),
the tokenizer's serialised content, the split parameters and ``FORMAT_VERSION``. Same fingerprint: the folder is reused. Any
change: it is rebuilt in a staging folder and swapped in atomically.

Each ``.bin`` file's sha256 is stored in meta.json and checked once per process
(per file size and mtime) when its tokens are opened: corrupted token bytes raise
``CorruptShardsError`` naming the file instead of training on garbage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from loopmoe.atomic import atomic_directory
from loopmoe.console import Progress
from loopmoe.data.sources import DataSource
from loopmoe.data.tokenizer import LMTokenizer
from loopmoe.errors import ConfigError, DataError, MissingFileError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: per-split sha256 in meta.json
SPLITS = ("train", "val")
Split = Literal["train", "val"]
# Documents are tokenised in batches of about this many characters (encode_batch runs them in parallel).
_BATCH_CHARS = 4_000_000


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits in 16 bits, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def is_validation_document(index: int, val_fraction: float) -> bool:
    """Whether document ``index`` belongs to the validation split (see module docstring)."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


@dataclass(frozen=True)
class ShardMeta:
    """The contents of meta.json."""

    format_version: int
    fingerprint: str
    source: str
    dtype: str
    vocab_size: int
    eos_id: int
    val_fraction: float
    tokens: dict[str, int]
    documents: dict[str, int]
    sha256: dict[str, str]


class CorruptShardsError(ValueError):
    """A shard file's bytes do not match the checksum recorded when it was built."""


_VERIFIED: set[tuple[str, int, int, str]] = set()


def _verify_bin(path: Path, expected: str) -> None:
    """Check ``path``'s sha256 against ``expected`` (once per process per file state)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected)
    if key in _VERIFIED:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise CorruptShardsError(
            f"token shard {str(path)!r} is corrupted (its sha256 does not match the one recorded in meta.json "
            "when it was built): delete the shard folder to rebuild it from the corpus"
        )
    _VERIFIED.add(key)


@dataclass(frozen=True)
class TokenShards:
    """A built shard folder. ``reused`` says whether this call found it already built."""

    directory: Path
    meta: ShardMeta
    reused: bool

    def tokens(self, split: Split = "train") -> np.ndarray:
        """The split's tokens as a read-only memmap (an empty array if the split is empty)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        dtype = np.dtype(self.meta.dtype)
        if self.meta.tokens[split] == 0:
            return np.zeros(0, dtype=dtype)
        path = self.directory / f"{split}.bin"
        _verify_bin(path, self.meta.sha256[split])
        return np.memmap(path, dtype=dtype, mode="r")


def shards_fingerprint(
    source: DataSource, tokenizer: LMTokenizer, val_fraction: float, *, legacy_spec: str | None = None
) -> str:
    """Hash of everything that determines the shard contents: the corpus's content (``source.identity()``,
    a sha256 of its bytes), not where it lies, so the same bytes through another path or
    ``LOOPMOE_DATA_DIR`` give the same fingerprint.

    ``legacy_spec``: the fingerprint older loopmoe wrote, which also hashed the source path (``spec``):
    pass the path recorded beside it (``ShardMeta.source``) to recognise shards and checkpoints of the
    same content written then (``fingerprint_matches``)."""
    parts: dict[str, object] = {
        "format_version": FORMAT_VERSION,
        "source_identity": source.identity(),
        "tokenizer_sha256": tokenizer.content_hash(),
        "eos_id": tokenizer.eos_id,
        "val_fraction": val_fraction,
    }
    if legacy_spec is not None:
        parts["source"] = legacy_spec
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def fingerprint_matches(
    fingerprint: str, source: DataSource, tokenizer: LMTokenizer, val_fraction: float, recorded_spec: str | None
) -> bool:
    """Whether ``fingerprint`` (of a shard folder or a checkpoint) is that of these shards: the content-based
    one, or the older path-including one with the path recorded when it was written (``recorded_spec``)."""
    if fingerprint == shards_fingerprint(source, tokenizer, val_fraction):
        return True
    return recorded_spec is not None and fingerprint == shards_fingerprint(
        source, tokenizer, val_fraction, legacy_spec=recorded_spec
    )


def prepare_shards(
    source: DataSource,
    tokenizer: LMTokenizer,
    directory: str | Path,
    *,
    val_fraction: float = 0.05,
    progress: bool = True,
) -> TokenShards:
    """Return the shards of ``source`` in ``directory``, tokenising only if they are missing or stale.

    In multi-process runs call this on one rank, then barrier, then open with
    ``load_shards`` on the others (concurrent builders would each build).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    directory = Path(directory)
    fingerprint = shards_fingerprint(source, tokenizer, val_fraction)
    existing = _try_load(directory)
    if existing is not None and fingerprint_matches(
        existing.meta.fingerprint, source, tokenizer, val_fraction, existing.meta.source
    ):
        log.info("reusing token shards in %s (fingerprint %s)", directory, fingerprint[:12])
        return existing
    reason = "none found" if existing is None else "source, tokenizer or split changed"
    log.info("building token shards in %s (%s)", directory, reason)

    dtype = token_dtype(tokenizer.vocab_size)
    with atomic_directory(directory, legacy_marker="meta.json") as staging:  # caches before the marker
        tokens, documents, sha256 = _tokenise(source, tokenizer, staging, dtype, val_fraction, progress)
        if documents["train"] == 0:
            raise DataError(
                f"data source {source.spec!r} has no training documents: it is empty or val_fraction is too high"
            )
        if val_fraction > 0 and documents["val"] == 0:
            n = documents["train"]
            hint = (
                f"raise data.val_fraction to at least {1 / n:.3g}, or use more data"
                if n >= 2
                else "use more data (or a corpus of several documents: text files are cut into documents of "
                "about 32k characters at line ends)"
            )
            raise DataError(
                f"data source {source.spec!r} has only {n} document{'s' if n != 1 else ''}, too few to hold "
                f"out val_fraction={val_fraction} of them for validation: {hint}"
            )
        meta = ShardMeta(
            format_version=FORMAT_VERSION,
            fingerprint=fingerprint,
            source=source.spec,
            dtype=dtype.name,
            vocab_size=tokenizer.vocab_size,
            eos_id=tokenizer.eos_id,
            val_fraction=val_fraction,
            tokens=tokens,
            documents=documents,
            sha256=sha256,
        )
        (staging / "meta.json").write_text(json.dumps(asdict(meta), indent=2))  # written last
    return TokenShards(directory, meta, reused=False)


def load_shards(directory: str | Path) -> TokenShards:
    """Open an already built shard folder (e.g. on non-zero ranks after rank 0 built it)."""
    shards = _try_load(Path(directory))
    if shards is None:
        raise MissingFileError(f"no complete token shards in {str(directory)!r}: build them with prepare_shards()")
    return shards


def _try_load(directory: Path) -> TokenShards | None:
    """The shards in ``directory`` if meta.json is readable, current and matches the .bin sizes."""
    try:
        meta = ShardMeta(**json.loads((directory / "meta.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if meta.format_version != FORMAT_VERSION:
        return None
    itemsize = np.dtype(meta.dtype).itemsize
    for split in SPLITS:
        path = directory / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != meta.tokens[split] * itemsize:
            return None
    return TokenShards(directory, meta, reused=True)


def _tokenise(
    source: DataSource,
    tokenizer: LMTokenizer,
    staging: Path,
    dtype: np.dtype,
    val_fraction: float,
    progress: bool,
) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
    tokens = dict.fromkeys(SPLITS, 0)
    digests = {split: hashlib.sha256() for split in SPLITS}
    documents = dict.fromkeys(SPLITS, 0)
    outputs = {split: open(staging / f"{split}.bin", "wb") for split in SPLITS}  # noqa: SIM115
    bar = Progress(f"tokenising {source.spec}", unit="doc", enabled=progress)
    try:
        index = 0
        for batch in _char_batches(source.documents()):
            for ids in tokenizer.encode_batch(batch):
                split = "val" if is_validation_document(index, val_fraction) else "train"
                array = np.array([*ids, tokenizer.eos_id], dtype=dtype)
                array.tofile(outputs[split])
                digests[split].update(array.tobytes())
                tokens[split] += array.size
                documents[split] += 1
                index += 1
            bar.update(len(batch), tokens=tokens["train"] + tokens["val"])
    finally:
        bar.close()
        for handle in outputs.values():
            handle.close()
    return tokens, documents, {split: digest.hexdigest() for split, digest in digests.items()}


def _char_batches(documents: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
