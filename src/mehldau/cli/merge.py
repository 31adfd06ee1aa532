"""`mehldau-merge ckpt=ADAPTER out=DIR`: fold an adapter into its base as a plain checkpoint.

The result loads, generates and can be adapted again without peft or the base on disk.
"""

from __future__ import annotations

import importlib
import sys

from mehldau.cli.common import compose_or_show, require, run_cli
from mehldau.train.checkpoint import read_meta, resolve_checkpoint

USAGE = """usage: mehldau-merge ckpt=ADAPTER_RUN_OR_CHECKPOINT out=DIR [force=true]"""


def _main(args: list[str]) -> int:
    cfg = compose_or_show("merge", args, USAGE)
    if cfg is None:
        return 0
    require(cfg, "ckpt", "out")
    ckpt = resolve_checkpoint(cfg.ckpt)
    meta = read_meta(ckpt)
    recipe = importlib.import_module(meta.get("recipe") or f"branches.{meta.get('branch')}.recipe")
    print(f"wrote {recipe.merge_checkpoint(cfg, ckpt)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("mehldau-merge", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
