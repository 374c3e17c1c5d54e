"""``torchrun ... faulty_cli.py ARGS``: the attnres command, except that the rank named by
``ATTNRES_TEST_KILL_RANK`` SIGKILLs itself when it fetches training batch ``ATTNRES_TEST_KILL_BATCH``
(0-based: the batch of step N is N - 1 with grad_accum=1), as a crashed or OOM-killed process would."""

import os
import signal
import sys

import attnres.data

_get = attnres.data.Batches.get


def _get_or_die(self, index):
    if os.environ.get("RANK") == os.environ.get("ATTNRES_TEST_KILL_RANK") and index == int(
        os.environ.get("ATTNRES_TEST_KILL_BATCH", "-1")
    ):
        os.kill(os.getpid(), signal.SIGKILL)
    return _get(self, index)


attnres.data.Batches.get = _get_or_die

if __name__ == "__main__":
    from attnres_cli import main

    sys.exit(main(sys.argv[1:]))
