"""The ``torch.library`` namespace of the model's custom ops.

The installed package registers its ops as ``loopmoe::*``. The same modules are also written into
every saved checkpoint as remote code (``loopmoe.model.remote_code``), where transformers imports
them under ``transformers_modules.<folder>...``; registering ``loopmoe::experts_loop`` a second
time in a process that also imported loopmoe (or another exported checkpoint) would fail. A copy
therefore registers its ops under a namespace of its own, fresh at each import.
"""

from __future__ import annotations

import uuid

INSTALLED_NAMESPACE = "loopmoe"


def op_namespace(module_name: str) -> str:
    """``"loopmoe"`` for a module of the installed package, a namespace unique to this import otherwise."""
    if module_name.split(".", 1)[0] == INSTALLED_NAMESPACE:
        return INSTALLED_NAMESPACE
    return f"{INSTALLED_NAMESPACE}_{uuid.uuid4().hex[:16]}"
