"""Errors a user can act on.

``loopmoe`` raises ``ValueError`` / ``FileNotFoundError`` for bad inputs, and ``UserFacingError``
(mixed into errors of other kinds: a busy run folder, a full disk, a refused checkpoint) for
faults whose message already names the way out. The CLI prints any of them as one line,
``loopmoe COMMAND: error: ...``, without a traceback.
"""

from __future__ import annotations


class UserFacingError(Exception):
    """An error whose message says what happened and what to do."""
