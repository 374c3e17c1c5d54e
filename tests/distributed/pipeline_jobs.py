"""``torchrun ... pipeline_jobs.py JOBS.json``: several ``attnres`` commands in one job (the processes'
start-up is most of a short run's cost), each through the `attnres` command (:func:`attnres_cli.main`), in order.

``JOBS.json`` is a list of ``{"argv": [...], "sigterm": [rank, batch] | null}``: with ``sigterm`` the
process of that rank sends itself SIGTERM when it fetches training batch ``batch`` (0-based), as a
scheduler stopping the job would. Each rank writes its exit codes to ``JOBS.json.rank{R}``. The process
group is left up between commands (the command's own ``shutdown`` is held back until the last).
"""

import json
import os
import signal
import sys
from pathlib import Path

import attnres.data
import attnres.distributed.world as world
from attnres_cli import main

_get, _shutdown = attnres.data.Batches.get, world.shutdown
SIGTERM_AT: list = [None]


def _get_or_stop(self, index):
    at = SIGTERM_AT[0]
    if at is not None and int(os.environ["RANK"]) == at[0] and index == at[1]:
        SIGTERM_AT[0] = None
        os.kill(os.getpid(), signal.SIGTERM)
    return _get(self, index)


def run(jobs_file: Path) -> None:
    attnres.data.Batches.get = _get_or_stop
    world.shutdown = lambda: None
    codes = []
    for job in json.loads(jobs_file.read_text()):
        SIGTERM_AT[0] = job.get("sigterm")
        codes.append(main(job["argv"]))
    Path(f"{jobs_file}.rank{os.environ['RANK']}").write_text(json.dumps(codes))
    _shutdown()


if __name__ == "__main__":
    run(Path(sys.argv[1]))
