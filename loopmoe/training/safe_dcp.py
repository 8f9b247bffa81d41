"""Loading torch.distributed.checkpoint (DCP) folders without running code from them.

DCP's own ``FileSystemReader.read_metadata`` is a plain ``pickle.load`` of ``<dir>/.metadata``
and its ``DefaultLoadPlanner.load_bytes`` is ``torch.load(weights_only=False)``: a crafted file
could run anything. Here ``.metadata`` goes through an unpickler that only builds DCP's metadata
classes, ``torch.Size``, dtypes and plain containers, and non-tensor entries are read with
``torch.load(weights_only=True)``. Anything else is refused with :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from loopmoe.errors import CheckpointError


class UnsafeCheckpointError(CheckpointError, RuntimeError):
    """A checkpoint file asks to build something other than plain checkpoint data: refused, not run."""


_METADATA_CLASSES = (
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "_MEM_FORMAT_ENCODING",
)


def _allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {}
    for name in _METADATA_CLASSES:
        if hasattr(dcp_metadata, name):
            allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(dcp_metadata, name)
    from torch.distributed.checkpoint import filesystem

    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            allowed[("torch", name)] = value
    # Layouts are pickled as torch.serialization._get_layout("torch.strided"): a table look-up.
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    for builtin in (set, frozenset, bytes, bytearray, complex, slice, range):
        allowed[("builtins", builtin.__name__)] = builtin
    # The checkpoint_id DCP stored (StorageMeta.checkpoint_id): constructing a path runs no I/O.
    for cls in (pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath):
        allowed[("pathlib", cls.__name__)] = cls
    return allowed


_ALLOWED = _allowed()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self.source}: refused to load {module}.{name}; a DCP .metadata file may only hold "
                "torch.distributed.checkpoint metadata, torch.Size, dtypes and plain containers, and loading "
                "never runs code from a checkpoint (the file is corrupt or was crafted)"
            ) from None


def load_dcp_metadata(path: str | Path) -> Metadata:
    """Unpickle a DCP ``.metadata`` file, building only the allow-listed metadata types."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            metadata = _RestrictedUnpickler(f, str(path)).load()
        except UnsafeCheckpointError:
            raise
        except Exception as e:
            raise UnsafeCheckpointError(f"{path}: not a DCP metadata file ({type(e).__name__}: {e})") from e
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is read by the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        metadata = load_dcp_metadata(path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        assert metadata.storage_meta is not None
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor entries are read with ``torch.load(weights_only=True)``."""

    storage_reader_path = "DCP checkpoint"

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"{self.storage_reader_path}: entry {read_item.dest_index.fqn!r} refused: loading never runs "
                f"code from a checkpoint ({e})"
            ) from e
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_dcp_load(state: dict[str, Any], directory: str | Path) -> None:
    """``dcp.load(state, checkpoint_id=directory)`` through the restricted reader and planner.

    The global ``.metadata`` is checked up front so a refused file raises :class:`UnsafeCheckpointError`
    itself rather than inside DCP's ``CheckpointException``; a refusal during the read is unwrapped too.
    """
    directory = Path(directory)
    metadata = directory / ".metadata"
    if metadata.is_file():
        load_dcp_metadata(metadata)
    planner = SafeLoadPlanner()
    planner.storage_reader_path = str(directory)
    try:
        with warnings.catch_warnings():  # one process resuming a multi-process checkpoint is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(state, storage_reader=SafeFileSystemReader(str(directory)), planner=planner)
    except CheckpointException as e:
        for failure, _ in e.failures.values():
            if isinstance(failure, UnsafeCheckpointError):
                raise UnsafeCheckpointError(str(failure)) from e
        raise
