"""Turn a source spec string into a stream of documents (plain strings).

Accepted specs (see ``open_source``):

* ``embedded``: the corpus that ships with Python (``loopmoe.data.embedded``);
* a text file (``.txt .text .md .raw .tokens``, optionally ``.gz .xz .bz2``) or a
  folder searched recursively for ``*.txt`` files;
* a JSON-lines file (``.jsonl .ndjson``, optionally ``.gz .xz .bz2``), one document
  per line in the field ``text_field``;
* ``.parquet .csv .json`` files, read with ``datasets.load_dataset``;
* ``hf:NAME`` or ``hf:NAME:CONFIG``: a HuggingFace dataset (hub name from the local
  cache, or a local dataset folder), split ``split``.

Text files are streamed line by line and cut into documents at the first blank
line after every ``chunk_chars`` characters (or, in text without blank lines, at
the line end after ``2 * chunk_chars``). A short file is therefore one
document, while a single large file (tinyshakespeare, a wiki dump) becomes many
documents of roughly ``chunk_chars`` characters, never cut inside a paragraph. This
keeps memory flat for huge files and gives the document-level validation split
something to hold out even when the corpus is one file.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import json
import lzma
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from loopmoe.data.embedded import embedded_documents, embedded_identity
from loopmoe.errors import DataError, MissingFileError

DEFAULT_CHUNK_CHARS = 32_768

_COMPRESSED: dict[str, Callable[..., IO[Any]]] = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw", ".tokens")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json"}

ACCEPTED_FORMATS = (
    "'embedded'; 'hf:NAME' or 'hf:NAME:CONFIG'; a folder of .txt files; a text file "
    f"({' '.join(_TEXT_SUFFIXES)}); a JSON-lines file ({' '.join(_JSONL_SUFFIXES)}); "
    "either optionally compressed (.gz .xz .bz2); or a .parquet/.csv/.json file"
)


@dataclass(frozen=True)
class DataSource:
    """A named, re-iterable stream of documents with a cheap change fingerprint.

    ``identity()`` changes whenever the documents may change (file contents by
    sha256, options, dataset fingerprint), so cached shards and tokenizers can be
    reused safely; a mere ``touch`` does not change it. File hashes are cached per
    process by (path, size, mtime).
    """

    spec: str
    _documents: Callable[[], Iterator[str]]
    _identity: Callable[[], str]

    def documents(self) -> Iterator[str]:
        """Yield documents in a fixed order; empty documents are skipped."""
        return (doc for doc in self._documents() if doc.strip())

    def identity(self) -> str:
        return self._identity()


def open_source(
    spec: str | Path,
    *,
    text_field: str = "text",
    split: str = "train",
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
) -> DataSource:
    """Resolve ``spec`` (see module docstring) into a DataSource; nothing is read yet.

    Raises FileNotFoundError for a missing path and ValueError for an unknown format,
    both naming the path and the accepted formats.
    """
    if chunk_chars <= 0:
        raise ValueError(f"chunk_chars must be positive, got {chunk_chars}")
    spec = str(spec)
    if spec == "embedded":
        return DataSource(spec, lambda: iter(embedded_documents()), embedded_identity)
    if spec.startswith("hf:"):
        return _hf_source(spec, text_field=text_field, split=split)

    path = Path(spec).expanduser()
    if not path.exists():
        raise MissingFileError(f"data source {spec!r} does not exist. Accepted: {ACCEPTED_FORMATS}")
    options = f"field={text_field}|chunk={chunk_chars}"
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise DataError(f"folder {spec!r} holds no .txt files. Accepted: {ACCEPTED_FORMATS}")
        return DataSource(
            spec,
            lambda: (doc for f in files for doc in _text_documents(f, chunk_chars)),
            lambda: _files_identity(files, options, root=path),
        )

    name = path.name.lower()
    base = name
    for suffix in _COMPRESSED:
        base = base.removesuffix(suffix)
    if base.endswith(_TEXT_SUFFIXES):

        def documents() -> Iterator[str]:
            return _text_documents(path, chunk_chars)
    elif base.endswith(_JSONL_SUFFIXES):

        def documents() -> Iterator[str]:
            return _jsonl_documents(path, text_field)
    elif name.endswith(tuple(_DATASETS_BUILDERS)):
        builder = _DATASETS_BUILDERS[path.suffix.lower()]

        def documents() -> Iterator[str]:
            return _dataset_documents(
                _load_dataset(spec, builder, data_files=str(path), split="train"), text_field, spec
            )
    else:
        raise DataError(f"unknown format for data source {spec!r}. Accepted: {ACCEPTED_FORMATS}")
    return DataSource(spec, documents, lambda: _files_identity([path], options))


def _open_text(path: Path) -> IO[str]:
    """Open a possibly compressed file as UTF-8 text (undecodable bytes become U+FFFD)."""
    opener: Callable[..., IO[Any]] = _COMPRESSED.get(path.suffix.lower(), open)
    return opener(path, "rt", encoding="utf-8", errors="replace")


def _text_documents(path: Path, chunk_chars: int) -> Iterator[str]:
    buffer: list[str] = []
    size = 0
    with _open_text(path) as handle:
        for line in handle:
            if size >= chunk_chars and not line.strip():
                yield "".join(buffer).strip()
                buffer, size = [], 0
                continue
            buffer.append(line)
            size += len(line)
            if size >= 2 * chunk_chars:  # no blank line for a while (e.g. none at all): cut at this line end
                yield "".join(buffer).strip()
                buffer, size = [], 0
    if buffer:
        yield "".join(buffer).strip()


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from error
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{path}:{number}: no field {text_field!r} (found {keys}); the run config reads the field 'text', so rename the field (or "
                    "call open_source(..., text_field=NAME) from Python)"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{number}: field {text_field!r} is {type(text).__name__}, not a string")
            yield text


def _hf_source(spec: str, *, text_field: str, split: str) -> DataSource:
    name, _, config = spec.removeprefix("hf:").partition(":")
    if not name:
        raise DataError(f"data source {spec!r} names no dataset. Accepted: {ACCEPTED_FORMATS}")

    @functools.cache
    def dataset():
        return _load_dataset(spec, name, config or None, split=split)

    return DataSource(
        spec,
        lambda: _dataset_documents(dataset(), text_field, spec),
        lambda: f"hf|{spec}|split={split}|field={text_field}|{dataset()._fingerprint}",
    )


def _load_dataset(spec: str, *args, **kwargs):
    import datasets  # imported lazily: it is slow and only these sources need it

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as error:  # datasets raises many unrelated types for "not found"
        raise MissingFileError(
            f"could not load data source {spec!r} with datasets.load_dataset: {error}. "
            f"Hub datasets must already be in the local cache when offline. Accepted: {ACCEPTED_FORMATS}"
        ) from error


def _dataset_documents(dataset, text_field: str, spec: str) -> Iterator[str]:
    if text_field not in dataset.column_names:
        raise DataError(
            f"data source {spec!r} has no column {text_field!r} (columns: {dataset.column_names}); the run "
            "config reads the column 'text', so rename the column (or call open_source(..., text_field=NAME) "
            "from Python)"
        )
    for batch in dataset.iter(batch_size=1000):
        yield from (text for text in batch[text_field] if text is not None)  # empty CSV cells


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, cached per process by (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def _files_identity(files: list[Path], options: str, root: Path | None = None) -> str:
    """Content fingerprint: file names (relative to ``root``) and sha256 of their bytes."""
    digest = hashlib.sha256(options.encode())
    for f in files:
        name = f.relative_to(root).as_posix() if root is not None else f.name
        digest.update(f"{name}|{file_sha256(f)}\n".encode())
    return digest.hexdigest()
