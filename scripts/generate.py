"""Thin equivalent of `mehldau-generate`: python scripts/generate.py ckpt=... out=...mid."""

import sys

from mehldau.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
