"""What every branch's generate does with its output, whatever made it: how long to play,
which device, and writing the scores (all or none) with a line per file.

The generation-output component: the autoregressive recipe and the diffusion branch both
use it, so neither imports the other.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


@dataclass(frozen=True)
class StreamedNote:
    """One note of a sample as it is being generated; times in seconds from the start of
    the written file (the prompt's start)."""

    row: int  # which sample of the batch
    start: float
    end: float
    pitch: int
    velocity: int


class NoteStream:
    """The notes of rows of ids that grow one id at a time, each note given once, when no later
    id can move its onset or drop it (for a page that plays a sample while it is sampled).

    A row is decoded again after each id (0.3 ms for 1,500 duration ids here), so the notes
    are exactly what `tokenizer.decode` writes, bar one case: for tokenizers that put the
    duration at the onset (`note_durations`) a note is given as soon as it is complete, and
    a later note of the same pitch may still end it sooner in the file. For note-on/note-off
    events a note is given once the clock has passed its end (a note still sounding is closed
    at the current time by `decode`, so it is not final). Prompt notes are not given."""

    def __init__(self, tokenizer, prompt: np.ndarray) -> None:  # prompt (B, P) ids
        self.tokenizer = tokenizer
        self.rows = [list(map(int, row)) for row in np.asarray(prompt)]
        self.after = [tokenizer.seconds_of(np.asarray(r)) for r in self.rows]  # prompt ends
        self.given: list[set[tuple[int, int]]] = [set() for _ in self.rows]

    def push(self, ids: Iterable[int]) -> list[StreamedNote]:
        """Append one id per row; returns the notes that became final, in onset order."""
        out = []
        for b, i in enumerate(ids):
            row = self.rows[b]
            row.append(int(i))
            score = self.tokenizer.decode(np.asarray(row, np.int64))
            seconds = score.to("second")
            if not seconds.tracks:
                continue
            clock = self.tokenizer.seconds_of(np.asarray(row, np.int64))
            ticks = score.tracks[0].notes.numpy()
            notes = seconds.tracks[0].notes.numpy()
            for k in np.argsort(notes["time"], kind="stable"):
                start = float(notes["time"][k])
                end = start + float(notes["duration"][k])
                key = (int(ticks["time"][k]), int(notes["pitch"][k]))
                if start < self.after[b] - 1e-6 or key in self.given[b]:
                    continue
                if not self.tokenizer.note_durations and end >= clock - 1e-6:
                    continue  # may still be sounding
                self.given[b].add(key)
                out.append(StreamedNote(b, start, end, int(notes["pitch"][k]),
                                        int(notes["velocity"][k])))
        return sorted(out, key=lambda n: (n.start, n.row, n.pitch))


def stream_notes(tokens: Iterable[torch.Tensor], tokenizer, prompt: np.ndarray
                 ) -> Iterator[StreamedNote]:
    """Notes as they become final, from a token stream (`mehldau.sampling.stream_tokens`)."""
    stream = NoteStream(tokenizer, prompt)
    for ids in tokens:
        yield from stream.push(ids.tolist())
