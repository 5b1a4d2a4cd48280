"""``python -m svdprune_utils <command>``: see :mod:`svdprune_utils.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
