"""The errors loopmoe raises for what a user can fix: one tree, each message naming the way out.

    LoopMoEError
    ├── ConfigError        a setting, option or argument that cannot work (also a ValueError)
    ├── DataError          a corpus, tokenizer, shard cache or task file that cannot be used (a ValueError)
    │   └── MissingFileError   a path that should exist does not (also a FileNotFoundError)
    ├── CheckpointError    a checkpoint or model folder that is refused, torn or inconsistent (a ValueError)
    └── RunError           the run itself: a busy folder, a full disk, divergence, a changed setting

The command line prints an error of this tree as one line, ``loopmoe COMMAND: error: ...``, and
lets every other exception through with its traceback: anything else is a bug in loopmoe (or a
dependency), whose location matters. ``LOOPMOE_TRACEBACK=1`` shows the traceback for both.

The ``ValueError`` / ``FileNotFoundError`` / ``RuntimeError`` bases (and those of the subclasses
elsewhere, e.g. a disk-full ``OSError``) keep ``except ValueError`` in
user code (and in the Python API's callers) working as before.
"""

from __future__ import annotations


class LoopMoEError(Exception):
    """An error whose message says what happened and what to do."""


class ConfigError(LoopMoEError, ValueError):
    """A setting, option or argument that cannot work; the message names the key and the fix."""


class DataError(LoopMoEError, ValueError):
    """Data that cannot be used: a corpus, tokenizer, shard cache, task file or prompt."""


class MissingFileError(DataError, FileNotFoundError):
    """A file or folder the command needs is not there."""


class CheckpointError(LoopMoEError, ValueError):
    """A checkpoint or model folder that loopmoe refuses to read or cannot use as it is."""


class RunError(LoopMoEError):
    """A fault of the run itself: a busy run folder, a full disk, divergence, a changed setting."""
