"""Piano-roll clips for the style judge, rendered from note lists (`tokenize.note_list`).

A clip is `seconds` of a performance as a one-channel roll `(1, 88, frames)`: each key's
velocity / 127 on every frame it sounds (sustain pedal folded in), as Cheston, Bance & Harrison
(2025) feed their ResNet. Rendering from notes when a clip is drawn keeps the corpus small and
lets augmentation act on exact times (their scheme: a transposition in ±6 semitones, a time
stretch in ×0.8–1.2 and a velocity offset in ±12, each applied with probability 0.5, on
training clips only).

One window rule everywhere (`cut_clip`): a clip of [start, start + seconds) holds the notes
that *start* in it, moved to start at 0; a note still sounding from before the window is not
in it. It is the rule `mehldau-compare` measures every continuation by (`features.cut`), so
the judge learns, is reported on, and scores branches, the human ceiling, the floors and its
distance reference on one kind of clip.

Clips are taken over a piece's performance span (first onset to last note end), so leading
and trailing silence is never a clip. Training item `i` is a pure function of (seed, i), as
for every training set here (`CropDataset`); evaluation clips are fixed: consecutive clips
over each piece, the last one moved back to end with the piece, so every clip is full
length (a piece shorter than a clip is one clip, padded with silence).

With damage families (`damaged_clips`), a share of training clips is damaged after it is cut
and labelled as the "unlike any pianist" class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from mehldau.data.dataset import CropDataset
from mehldau.errors import UserError
from mehldau.tokenize.note_list import END, MAX_PITCH, MIN_PITCH, ONSET, PITCH, VELOCITY

NUM_KEYS = MAX_PITCH - MIN_PITCH + 1


def cut_clip(notes: np.ndarray, start: float, seconds: float) -> np.ndarray:
    """The notes `(N, 4)` that start in [start, start + seconds), times moved to start at 0
    (ends not cut: a roll stops drawing them at the clip's end)."""
    notes = np.asarray(notes, np.float32).reshape(-1, 4)
    keep = (notes[:, ONSET] >= start) & (notes[:, ONSET] < start + seconds)
    out = notes[keep].copy()
    out[:, [ONSET, END]] -= start
    return out


def render_clip(notes: np.ndarray, start: float, seconds: float, fps: int, channels: int = 1
                ) -> np.ndarray:
    """Notes `(N, 4)` -> float32 roll of the clip `cut_clip(notes, start, seconds)`: with one
    channel `(88, frames)`, velocity / 127 where a key sounds (the louder of two overlapping
    notes), 0 elsewhere; with two `(2, 88, frames)`, that and the onset map (1 on the frame
    each note starts), which keeps apart a repeated note and a held one and shows where the
    attacks fall in time (rhythm, a grid) without the model having to find edges."""
    frames = max(1, int(round(seconds * fps)))
    roll = np.zeros((NUM_KEYS, frames), np.float32)
    onsets = np.zeros((NUM_KEYS, frames), np.float32)
    notes = cut_clip(notes, start, seconds)
    if len(notes):
        on = np.floor(notes[:, ONSET] * fps).astype(np.int64)
        off = np.maximum(np.round(notes[:, END] * fps).astype(np.int64), on + 1)
        on, off = np.clip(on, 0, frames), np.clip(off, 0, frames)
        keep = off > on
        on, off = on[keep], off[keep]
        key = notes[keep, PITCH].astype(np.int64) - MIN_PITCH
        vel = notes[keep, VELOCITY].astype(np.float32) / 127.0
        length = off - on
        owner = np.repeat(np.arange(len(on)), length)
        frame = on[owner] + np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length,
                                                                     length)
        np.maximum.at(roll, (key[owner], frame), vel[owner])
        onsets[key, on] = 1.0
    if channels == 1:
        return roll
    if channels == 2:
        return np.stack([roll, onsets])
    raise ValueError(f"a clip renders 1 or 2 channels, not {channels}")


def span(notes: np.ndarray) -> tuple[float, float]:
    """(first onset, last note end) of a piece, seconds; (0, 0) without notes."""
    if len(notes) == 0:
        return 0.0, 0.0
    return float(notes[:, ONSET].min()), float(notes[:, END].max())


@dataclass(frozen=True)
class ClipAugmentation:
    """Cheston et al.'s augmentation, each part drawn with probability `p` per clip."""

    transpose: int = 6  # semitones, uniform in [-transpose, +transpose]
    stretch: tuple[float, float] = (0.8, 1.2)  # time factor, uniform
    velocity: int = 12  # offset added to every note's velocity, uniform in [-v, +v]
    p: float = 0.5

    def __post_init__(self) -> None:
        lo, hi = self.stretch
        if self.transpose < 0 or self.velocity < 0 or not 0 < lo <= hi or not 0 <= self.p <= 1:
            raise UserError(f"bad judge.augment {self}: transpose and velocity >= 0, "
                            "0 < stretch_min <= stretch_max, 0 <= p <= 1")

    def apply(self, notes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augmented copy of `notes`; every draw is made whether or not it is used, so the
        clip a given index yields does not depend on which parts fired."""
        fire = rng.random(3) < self.p
        shift = int(rng.integers(-self.transpose, self.transpose + 1))
        factor = float(rng.uniform(*self.stretch))
        offset = int(rng.integers(-self.velocity, self.velocity + 1))
        out = notes.copy()
        if fire[0] and shift:
            out[:, PITCH] += shift
            out = out[(out[:, PITCH] >= MIN_PITCH) & (out[:, PITCH] <= MAX_PITCH)]
        if fire[1]:
            out[:, [ONSET, END]] *= factor
        if fire[2]:
            out[:, VELOCITY] = np.clip(out[:, VELOCITY] + offset, 1, 127)
        return out


NO_CLIP_AUGMENTATION = ClipAugmentation(0, (1.0, 1.0), 0, 0.0)


@dataclass(frozen=True)
class Damaging:
    """Which training clips become "unlike any pianist" clips: a `share` of them, each by one
    of `families` (`damaged_clips.FAMILIES`), labelled `label`."""

    families: tuple[str, ...]
    share: float
    label: int


class ClipDataset(CropDataset):
    """Training clips: a piece drawn with probability proportional to its span, a clip start
    uniform over it, augmented, cut (`cut_clip`), with `damaging` damaged by a family drawn
    at random, rendered; {"x": (1, 88, frames), "labels": class}. A clip without a note is
    drawn again (up to `tries` times)."""

    def __init__(self, pieces: Sequence[np.ndarray], labels: Sequence[int], seconds: float,
                 fps: int, seed: int = 0, augment: ClipAugmentation = NO_CLIP_AUGMENTATION,
                 tries: int = 8, damaging: Damaging | None = None, channels: int = 1) -> None:
        keep = [i for i, n in enumerate(pieces) if len(n)]
        self.pieces = [pieces[i] for i in keep]
        self.labels = [int(labels[i]) for i in keep]
        self._init_crops([max(span(n)[1] - span(n)[0], 1e-3) for n in self.pieces], seed)
        self.seconds, self.fps, self.clip_augment, self.tries = seconds, fps, augment, tries
        self.damaging = damaging if damaging is not None and damaging.families else None
        self.channels = channels

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from mehldau.data.damaged_clips import damage

        rng = self._rng(index)
        for _ in range(self.tries):
            k = self._pick(rng)
            notes = self.clip_augment.apply(self.pieces[k], rng)
            a, b = span(notes)
            start = float(rng.uniform(a, max(a, b - self.seconds)))
            clip = cut_clip(notes, start, self.seconds)
            if len(clip):
                break
        label = self.labels[k]
        d = self.damaging
        if d is not None and rng.random() < d.share:
            family = d.families[int(rng.integers(len(d.families)))]
            clip, label = damage(clip, self.seconds, family, rng), d.label
        roll = render_clip(clip, 0.0, self.seconds, self.fps, self.channels)
        return {"x": torch.from_numpy(roll).reshape(self.channels, NUM_KEYS, -1),
                "labels": torch.tensor(label)}


def clip_starts(notes: np.ndarray, seconds: float, hop: float | None = None) -> list[float]:
    """Starts of the fixed evaluation clips of one piece: every `hop` (default: `seconds`)
    from its first onset, the last moved back to end with the piece."""
    a, b = span(notes)
    hop = seconds if hop is None else hop
    n = max(1, math.ceil((b - a - seconds) / hop - 1e-9) + 1)
    return [min(a + i * hop, max(a, b - seconds)) for i in range(n)]


class ClipWindows(Dataset):
    """Evaluation clips over every piece (`clip_starts`): {"x", "labels"}, and `piece[i]`,
    the index of the piece clip i comes from (for per-piece scores). With `damaging`, each
    clip is followed by a damaged copy of it (families in turn, seeded by its position), so
    the validation loss weighs the "unlike any pianist" class too."""

    def __init__(self, pieces: Sequence[np.ndarray], labels: Sequence[int], seconds: float,
                 fps: int, hop: float | None = None, damaging: Damaging | None = None,
                 seed: int = 0, channels: int = 1) -> None:
        self.pieces, self.labels, self.seconds, self.fps = list(pieces), list(labels), seconds, fps
        real = [(k, s, None) for k, n in enumerate(self.pieces) if len(n)
                for s in clip_starts(n, seconds, hop)]
        self.damaging, self.seed = damaging if damaging and damaging.families else None, seed
        self.channels = channels
        fam = self.damaging.families if self.damaging else ()
        self.index = [row for i, (k, s, _) in enumerate(real)
                      for row in [(k, s, None)] + ([(k, s, fam[i % len(fam)])] if fam else [])]
        self.piece = np.array([k for k, _, _ in self.index], np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from mehldau.data.damaged_clips import damage

        k, s, family = self.index[i]
        clip = cut_clip(self.pieces[k], s, self.seconds)
        label = self.labels[k]
        if family is not None:
            clip = damage(clip, self.seconds, family, np.random.default_rng([self.seed, i]))
            label = self.damaging.label
        roll = render_clip(clip, 0.0, self.seconds, self.fps, self.channels)
        return {"x": torch.from_numpy(roll).reshape(self.channels, NUM_KEYS, -1),
                "labels": torch.tensor(label)}


def windows_after(notes: np.ndarray, offset: float, seconds: float) -> list[float]:
    """Starts of the clips `mehldau-compare` cuts from a piece after a prompt of `offset`
    seconds (from the file's time 0, as a prompt is cut): offset, offset + seconds, ... while
    a whole clip fits before the piece's last note end; a piece too short for one after the
    offset gives the one clip at the offset when a note starts there."""
    end = span(notes)[1]
    starts = []
    while offset + (len(starts) + 1) * seconds <= end + 1e-9:
        starts.append(offset + len(starts) * seconds)
    if not starts and len(notes) and (notes[:, ONSET] >= offset).any():
        starts = [offset]
    return starts


def count_clips(batch: dict[str, torch.Tensor]) -> int:
    """Clips in a batch: the unit of the judge's loss."""
    return int(batch["x"].shape[0])
