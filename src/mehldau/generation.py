"""What every branch's generate does with its output, whatever made it: how long to play,
which device, and writing the scores (all or none) with a line per file.

The generation-output component: the autoregressive recipe and the diffusion branch both
use it, so neither imports the other.
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mehldau.errors import UserError
from mehldau.io import atomic_write_midi

# Settings of mehldau-generate every branch uses (where the checkpoint is, where to write,
# whether to draw and render what was written).
EVERY_BRANCH = frozenset({"ckpt", "out", "branch", "render", "soundfont"})


def _leaves(node, prefix: str = "") -> dict[str, object]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, object] = {}
    for k, v in node.items():
        out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_settings(cfg: DictConfig, defaults: DictConfig, branch: str,
                   uses: Collection[str]) -> None:
    """Refuse, in one line, a setting changed from its default in `defaults` (the composed
    configs/generate.yaml) that `branch` does not read: a value that would be ignored
    without a word. `uses`: the branch's top-level settings (its recipe's GENERATE_SETTINGS)."""
    given = _leaves(OmegaConf.to_container(cfg, resolve=True))
    default = _leaves(OmegaConf.to_container(defaults, resolve=True))
    allowed = set(uses) | EVERY_BRANCH
    for key, value in given.items():
        if key.split(".")[0] in allowed or (key in default and default[key] == value):
            continue
        raise UserError(f"{branch} does not use {key}; drop it (it uses: "
                        f"{', '.join(sorted(set(uses)))})")


def cap_durations(score, max_seconds: float | None):
    """Cut notes longer than `max_seconds` (Magenta's `max_note_duration`): a note-on/off
    model sometimes never emits a note's note-off, which would otherwise ring to the end.
    Returns (score, number of notes cut): notes closed by this safety net, not by the model."""
    if not max_seconds:
        return score, 0
    secs = score.to("second")
    cut = 0
    for track in secs.tracks:
        for note in track.notes:
            if note.duration > float(max_seconds):
                note.duration = float(max_seconds)
                cut += 1
    return secs.to("tick"), cut


def generate_seconds(cfg: DictConfig, default: float = 30.0) -> float:
    """`seconds=` of mehldau-generate, or the branch's default when it is null."""
    return float(cfg.seconds) if cfg.get("seconds") is not None else default


def device_for(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible; use device=cpu")
    return torch.device(name)


def out_paths(out: str | Path, n: int) -> list[Path]:
    out = Path(out).expanduser()
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i + 1}{out.suffix}") for i in range(n)]


def write_scores(scores: list, out: str | Path, notes_cut: list[int] | None = None
                 ) -> list[Path]:
    """Each score to its file (FILE.mid, or FILE_1.mid, ... for several), all or none.
    `notes_cut`: per score, the notes the `max_note_seconds` safety net closed (reported)."""
    paths = out_paths(out, len(scores))
    for score, path in zip(scores, paths):
        atomic_write_midi(score, path)
    for i, (score, path) in enumerate(zip(scores, paths)):
        line = f"{path}: {score.note_num()} notes, {score.to('second').end():.1f} s"
        if notes_cut is not None:
            line += f", {notes_cut[i]} closed by the max_note_seconds cut"
        print(line, file=sys.stderr)
    return paths
