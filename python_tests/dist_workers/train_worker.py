"""zofo-train as a torchrun worker: ``torchrun ... train_worker.py <zofo-train arguments>``."""

import sys

from zofo_kernels.apps import train

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
