"""`mehldau-merge ckpt=ADAPTER out=DIR`: fold an adapter into its base as a plain checkpoint.

The result loads, generates and can be adapted again without peft or the base on disk.
"""

from __future__ import annotations

import sys

from mehldau.cli.common import compose_or_show, run_cli
from mehldau.train.checkpoint import branch_recipe, resolve_checkpoint

USAGE = """usage: mehldau-merge ckpt=ADAPTER_RUN_OR_CHECKPOINT out=DIR [force=true]"""


def _main(args: list[str]) -> int:
    cfg = compose_or_show("merge", args, USAGE, required=("ckpt", "out"))
    if cfg is None:
        return 0
    ckpt = resolve_checkpoint(cfg.ckpt)
    print(f"wrote {branch_recipe(ckpt).merge_checkpoint(cfg, ckpt)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("mehldau-merge", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
