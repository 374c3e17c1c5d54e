"""``python slow_cli.py DELAY ARGS...``: the attnres CLI with every training batch delayed by DELAY
seconds, so a test can signal it between checkpoints. Only the timing differs from ``attnres``."""

import sys
import time

import attnres.data

_get = attnres.data.Batches.get


def _slow_get(self, step):
    time.sleep(float(sys.argv[1]))
    return _get(self, step)


attnres.data.Batches.get = _slow_get

if __name__ == "__main__":
    from attnres.cli import main

    sys.exit(main(sys.argv[2:]))
