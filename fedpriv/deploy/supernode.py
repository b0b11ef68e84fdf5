"""Flower's `flower-supernode`, answering every message through the site's resident worker; the agent runs it as `python -m` this module.

Its command line is Flower's own, with `--isolation process` (Flower starts
no SuperExec and no ClientApp process). The worker folder is named by
`WORKER_ENV`. Why and how it answers in place, and how its polling changes,
is in `flower_compat.run_supernode_polling_often`.
"""

import os
import sys
from pathlib import Path

from fedpriv.common.flower_compat import run_supernode_polling_often
from fedpriv.deploy.site_worker import WORKER_ENV, WorkerChannel

if __name__ == "__main__":
    folder = os.environ.get(WORKER_ENV)
    if not folder:
        sys.exit(f"fedpriv: {WORKER_ENV} names no site worker folder; the agent starts this SuperNode")
    run_supernode_polling_often(WorkerChannel(Path(folder)))
