"""A worker for ``loopmoe.distributed.launch`` tests: records the environment the launcher gave it in
``OUT/rank<R>.json``, then exits with the status named for its rank (``rank1=3``; ``rank1=SIGKILL``
kills itself with that signal), after the other ranks have written theirs."""

import json
import os
import signal
import sys
import time
from pathlib import Path

KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")

if __name__ == "__main__":
    out, *endings = sys.argv[1:]
    rank = os.environ["RANK"]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({k: os.environ.get(k) for k in KEYS}))
    ending = dict(e.split("=") for e in endings).get(f"rank{rank}")
    if ending is None:
        sys.exit(0)
    time.sleep(1)  # the first failure ends every worker: let the others record their environment first
    if ending.startswith("SIG"):
        os.kill(os.getpid(), signal.Signals[ending])
    sys.exit(int(ending))
