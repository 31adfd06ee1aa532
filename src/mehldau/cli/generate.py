"""`mehldau-generate ckpt=PATH out=FILE.mid [options]`: sample MIDI from a trained checkpoint.

The checkpoint's `meta.json` names its branch; that branch's recipe `generate(cfg, ckpt)`
loads the model and tokenizer saved beside the weights and writes the files.
"""

from __future__ import annotations

import importlib
import sys

from omegaconf import OmegaConf

from mehldau.cli.common import compose, require, run_cli
from mehldau.errors import UserError
from mehldau.train.checkpoint import read_meta, resolve_checkpoint

USAGE = """usage: mehldau-generate ckpt=RUN_OR_CHECKPOINT out=FILE.mid [key=value ...]

Options: prompt=FILE.mid prompt_seconds=S seconds=S temperature=T top_k=K top_p=P seed=N
         num_samples=N use_cache=true|false device=auto|cpu|cuda
--cfg prints the composed configuration and exits."""


def _main(args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    show = "--cfg" in args
    cfg = compose("generate", [a for a in args if a != "--cfg"])
    if show:
        print(OmegaConf.to_yaml(cfg))
        return 0
    require(cfg, "ckpt", "out")
    for key in ("seconds", "num_samples", "temperature"):
        if cfg[key] is None or cfg[key] <= 0:
            raise UserError(f"{key} must be positive, got {cfg[key]}")
    if cfg.prompt is not None and cfg.prompt_seconds <= 0:
        raise UserError(f"prompt_seconds must be positive, got {cfg.prompt_seconds}")
    if not str(cfg.out).lower().endswith((".mid", ".midi")):
        raise UserError(f"out must be a .mid file path, got '{cfg.out}'")
    ckpt = resolve_checkpoint(cfg.ckpt)
    meta = read_meta(ckpt)
    branch = meta.get("branch")
    wanted = cfg.branch.name if cfg.get("branch") else None
    if wanted is not None and wanted != branch:
        raise UserError(f"checkpoint {ckpt} is from branch '{branch}', not '{wanted}'; "
                        f"drop branch= or pass a {wanted} checkpoint")
    recipe_name = meta.get("recipe") or f"branches.{branch}.recipe"
    try:
        recipe = importlib.import_module(recipe_name)
    except ModuleNotFoundError as e:
        raise UserError(f"checkpoint {ckpt} names unknown branch '{branch}'; it was not written "
                        "by this version of mehldau") from e
    for path in recipe.generate(cfg, ckpt):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("mehldau-generate", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
