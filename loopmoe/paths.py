"""Where LoopMoE finds data that is too large to live in the repository.

Real corpora and reference tokenizers sit in a shared folder beside the checkout
(``<checkout>/../shared/data``); the ``LOOPMOE_DATA_DIR`` environment variable
overrides that so the same code runs on machines with another layout.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "LOOPMOE_DATA_DIR"


def shared_data_dir() -> Path | None:
    """Return the shared data folder, or None when this machine has none.

    Order: ``$LOOPMOE_DATA_DIR`` when set (returned even if missing, so a typo
    surfaces as a clear FileNotFoundError later instead of silently falling back),
    then ``shared/data`` beside the repository checkout if it exists.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    beside_checkout = Path(__file__).resolve().parents[2] / "shared" / "data"
    return beside_checkout if beside_checkout.is_dir() else None
