"""Thin equivalent of `mehldau-compare`: python scripts/compare.py runs=[A,B] out=DIR."""

import sys

from mehldau.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
