"""``python -m attnres`` and ``torchrun ... -m attnres``: the ``attnres`` command (:func:`attnres_cli.main`)."""

import sys

from attnres_cli import main

if __name__ == "__main__":
    sys.exit(main())
