"""Thin equivalent of `mehldau-train`: python scripts/train.py [key=value ...]."""

import sys

from mehldau.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
