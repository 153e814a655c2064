"""``python -m zofo_kernels.apps.train``: the ``zofo-train`` command."""

import sys

from zofo_kernels.apps.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
