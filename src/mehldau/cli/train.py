"""`mehldau-train [key=value ...]`: compose the Hydra config and hand it to the branch's recipe.

The core never imports a branch by name: the chosen `branch` config says which recipe module
to load (`branch.recipe`), and that module's `train(cfg)` does the rest.
"""

from __future__ import annotations

import importlib
import sys

from omegaconf import DictConfig

from mehldau.cli.common import compose_or_show, run_cli
from mehldau.errors import UserError

USAGE = """usage: mehldau-train [--cfg] [key=value ...]

Train a branch (default: production, tiny preset, on the embedded demo corpus).
Examples:
  mehldau-train run_dir=runs/demo
  mehldau-train data=folder data.root=~/midi model=base train.max_steps=20000
  mehldau-train data=pijama data.root=~/pijama data.pianist="Brad Mehldau"
  mehldau-train run_dir=runs/demo train.resume=true
--cfg prints the composed configuration and exits."""


def load_recipe(cfg: DictConfig):
    try:
        return importlib.import_module(cfg.branch.recipe)
    except ModuleNotFoundError as e:
        raise UserError(f"branch '{cfg.branch.name}' has no recipe module {cfg.branch.recipe}; "
                        "is the package installed with `pip install -e .`?") from e


def _main(args: list[str]) -> int:
    cfg = compose_or_show("train", args, USAGE)
    if cfg is None:
        return 0
    if cfg.model.get("branch") not in (None, cfg.branch.name):
        raise UserError(f"model preset '{cfg.model.get('preset')}' is for branch "
                        f"'{cfg.model.branch}', not '{cfg.branch.name}'; pick a "
                        f"{cfg.branch.name} preset")
    recipe = load_recipe(cfg)
    run_dir = recipe.train(cfg)
    print(f"mehldau-train: done; run directory {run_dir}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("mehldau-train", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
