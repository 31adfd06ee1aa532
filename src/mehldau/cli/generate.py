"""`mehldau-generate ckpt=PATH out=FILE.mid [options]`: sample MIDI from a trained checkpoint.

The checkpoint's `meta.json` names its branch; that branch's recipe `generate(cfg, ckpt)`
loads the model and tokenizer saved beside the weights and writes the files.
"""

from __future__ import annotations

import sys

from mehldau.cli.common import compose, compose_or_show, run_cli
from mehldau.errors import UserError
from mehldau.generation import check_settings
from mehldau.sampling import SamplingConfig
from mehldau.settings import checked
from mehldau.train.checkpoint import branch_recipe, read_meta, resolve_checkpoint

USAGE = """usage: mehldau-generate ckpt=RUN_OR_CHECKPOINT out=FILE.mid [key=value ...]

Options: prompt=FILE.mid prompt_seconds=S seconds=S temperature=T top_k=K top_p=P seed=N
         num_samples=N use_cache=true|false device=auto|cpu|cuda
A setting the checkpoint's branch does not use is refused, naming the ones it uses.
scg_diffusion: rules.reference=FILE.mid rules.offset=S rules.use=[pitch_histogram,...]
         rules.targets=FILE.json scg.candidates=N sampler.steps=N sampler.eta=E
--cfg prints the composed configuration and exits."""


def _main(args: list[str]) -> int:
    cfg = compose_or_show("generate", args, USAGE, required=("ckpt", "out"))
    if cfg is None:
        return 0
    for key in ("seconds", "num_samples", "temperature"):
        if key == "seconds" and cfg.seconds is None:
            continue  # the branch's default
        if cfg[key] is None or cfg[key] <= 0:
            raise UserError(f"{key} must be positive, got {cfg[key]}")
    if cfg.prompt is not None and cfg.prompt_seconds <= 0:
        raise UserError(f"prompt_seconds must be positive, got {cfg.prompt_seconds}")
    if not str(cfg.out).lower().endswith((".mid", ".midi")):
        raise UserError(f"out must be a .mid file path, got '{cfg.out}'")
    checked(SamplingConfig, {k: cfg[k] for k in ("temperature", "top_k", "top_p")}, "")
    ckpt = resolve_checkpoint(cfg.ckpt)
    meta = read_meta(ckpt)
    branch = meta.get("branch")
    wanted = cfg.branch.name if cfg.get("branch") else None
    if wanted is not None and wanted != branch:
        raise UserError(f"checkpoint {ckpt} is from branch '{branch}', not '{wanted}'; "
                        f"drop branch= or pass a {wanted} checkpoint")
    recipe = branch_recipe(ckpt, meta)
    uses = getattr(recipe, "GENERATE_SETTINGS", None)
    if uses is not None:  # a setting the branch would ignore is refused, not dropped
        check_settings(cfg, compose("generate", []), str(branch), uses)
    for path in recipe.generate(cfg, ckpt):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("mehldau-generate", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
