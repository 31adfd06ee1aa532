"""`mehldau-generate ckpt=PATH out=FILE.mid [options]`: sample MIDI from a trained checkpoint.

The checkpoint's `meta.json` names its branch; that branch's recipe `generate(cfg, ckpt)`
loads the model and tokenizer saved beside the weights and writes the files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mehldau.cli.common import compose, compose_or_show, run_cli
from mehldau.errors import UserError
from mehldau.generation import check_settings
from mehldau.sampling import SamplingConfig
from mehldau.settings import checked
from mehldau.train.checkpoint import branch_recipe, read_meta, resolve_checkpoint

USAGE = """usage: mehldau-generate ckpt=RUN_OR_CHECKPOINT out=FILE.mid [key=value ...]

Options: prompt=FILE.mid prompt_seconds=S seconds=S temperature=T top_k=K top_p=P seed=N
         num_samples=N use_cache=true|false device=auto|cpu|cuda
         render=true (also FILE.png piano roll and FILE.wav via fluidsynth; soundfont=FILE.sf2)
A setting the checkpoint's branch does not use is refused, naming the ones it uses.
scg_diffusion: rules.reference=FILE.mid rules.offset=S rules.use=[pitch_histogram,...]
         rules.targets=FILE.json scg.candidates=N sampler.steps=N sampler.eta=E
         sampler.name=ddim|dpmpp_2m_sde|dpmpp_2m sampler.spacing=uniform|logsnr
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
        if cfg.render:
            _render(path, cfg)
    return 0


def _render(midi: Path, cfg) -> None:
    from mehldau.evaluation import sample_view as view

    start = float(cfg.prompt_seconds) if cfg.prompt is not None else 0.0
    view.piano_roll_png(midi, midi.with_suffix(".png"), start, title=midi.name)
    print(f"wrote {midi.with_suffix('.png')}")
    if view.render_wav(midi, midi.with_suffix(".wav"), cfg.soundfont):
        print(f"wrote {midi.with_suffix('.wav')}")
    else:
        print(f"mehldau-generate: {view.INSTALL_AUDIO}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return run_cli("mehldau-generate", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
