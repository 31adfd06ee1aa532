"""Packed training contexts and evaluation windows of compound rows (Moonbeam's tokens).

The reference (docs/moonbeam.md §4.3) packs whole samples `[SOS] events [EOS]` greedily into
a context and truncates the ones that do not fit, which would keep only the first minute of a
ten-minute Mehldau performance. Here every sample is cut into crops that fit, at a random
place, so the whole performance is seen over training; short samples (and the tail of a
context) are packed as in the reference, each with its own id in `attention_mask` so the
model's block-diagonal causal mask keeps them apart.

Deviations, each because the reference's choice trains on nothing useful:
- each crop's onsets are re-based so its first event is at 0 (what the reference's
  `--ts_threshold` chunks do), so a crop looks like a sample start and onsets stay small;
- a crop gets an EOS row only where its sample really ends;
- a sample's SOS row has no target (the reference trains the previous sample's last
  position to predict it, across the boundary), and padding has none (the reference trains
  pads to predict id 0).

Item `i` of the training set is a pure function of `(seed, i)`, like the other datasets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mehldau.constants import IGNORE_INDEX
from mehldau.data.dataset import NO_AUGMENTATION, Augmentation, CropDataset
from mehldau.tokenize.compound import EOS, NUM_ATTRIBUTES, SOS, CompoundTokenizer

_SOS_ROW = np.full((1, NUM_ATTRIBUTES), SOS, np.int64)
_EOS_ROW = np.full((1, NUM_ATTRIBUTES), EOS, np.int64)


def split_samples(sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
    """`[SOS] events [EOS] [SOS] ...` arrays -> the (n, 6) events of each non-empty sample."""
    out = []
    for seq in sequences:
        seq = np.asarray(seq, np.int64).reshape(-1, NUM_ATTRIBUTES)
        starts = np.flatnonzero(seq[:, 0] == SOS)
        for a, b in zip(starts, [*starts[1:], len(seq)]):
            events = seq[a + 1 : b]
            events = events[events[:, 0] >= 0]
            if len(events):
                out.append(events)
    return out


def crop_rows(events: np.ndarray, start: int, n: int) -> np.ndarray:
    """`[SOS] + events[start:start+n]` re-based to onset 0, `+ [EOS]` if the sample ends there."""
    crop = events[start : start + n].copy()
    crop[:, 0] -= crop[0, 0]
    tail = [_EOS_ROW] if start + n >= len(events) else []
    return np.concatenate([_SOS_ROW, crop, *tail])


def _labels(tokenizer: CompoundTokenizer, rows: np.ndarray) -> np.ndarray:
    labels = tokenizer.to_labels(rows)
    labels[rows[:, 0] == SOS] = IGNORE_INDEX
    return labels


def _item(parts: list[tuple[np.ndarray, np.ndarray]], context_len: int) -> dict[str, torch.Tensor]:
    ids = np.zeros((context_len, NUM_ATTRIBUTES), np.int64)  # pads: the reference's [0]*6
    labels = np.full((context_len, NUM_ATTRIBUTES + 1), IGNORE_INDEX, np.int64)
    sample = np.zeros(context_len, np.int64)  # 0 = padding, 1.. = packed samples
    at = 0
    for k, (rows, lab) in enumerate(parts, start=1):
        ids[at : at + len(rows)], labels[at : at + len(rows)] = rows, lab
        sample[at : at + len(rows)] = k
        at += len(rows)
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(sample)}


class PackedCropDataset(CropDataset):
    """Training contexts of `context_len` rows: random crops, packed, augmented per crop.

    A sample is drawn with probability proportional to its length, then a crop of it that
    fits the room left (at most `context_len - 2` events, so SOS and EOS fit); crops are
    added until fewer than `min_crop + 2` rows are free.
    """

    def __init__(self, sequences: Sequence[np.ndarray], context_len: int,
                 tokenizer: CompoundTokenizer, seed: int = 0,
                 augment: Augmentation = NO_AUGMENTATION, min_crop: int = 16) -> None:
        self.samples = split_samples(sequences)
        if not self.samples:
            raise ValueError("PackedCropDataset needs at least one sample with events")
        if context_len < 3:
            raise ValueError(f"context_len must be >= 3, got {context_len}")
        self._init_crops([len(s) for s in self.samples], seed)
        self.context_len, self.tokenizer, self.augment = context_len, tokenizer, augment
        self.min_crop = max(1, min(min_crop, context_len - 2))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        room = self.context_len
        while room >= self.min_crop + 2:
            events = self.samples[self._pick(rng)]
            n = min(len(events), room - 2)
            rows = self._augmented(
                crop_rows(events, int(rng.integers(0, len(events) - n + 1)), n), rng)
            if len(rows) < 2:  # every event transposed off the keyboard
                continue
            parts.append((rows, _labels(self.tokenizer, rows)))
            room -= len(rows)
        return _item(parts, self.context_len)


class EventWindowDataset(Dataset):
    """Evaluation: each sample cut into windows of up to `context_len - 2` events, one
    window per item (not packed), so every event is predicted exactly once.

    Without `stride`: consecutive windows (what val loss uses). With `stride`: each window
    holds the up to `context_len - 2` events that end at its last target and labels only its
    last `stride` events (the scoring policy of `mehldau.evaluation.likelihood`). Onsets are
    re-based to each window's first event, as in training crops."""

    def __init__(self, sequences: Sequence[np.ndarray], context_len: int,
                 tokenizer: CompoundTokenizer, stride: int | None = None) -> None:
        self.context_len = context_len
        self.windows = []
        room = context_len - 2
        if stride is not None and not 0 < stride <= room:
            raise ValueError(f"stride must be in 1..{room}, got {stride}")
        for events in split_samples(sequences):
            for start in range(0, len(events), stride or room):
                if stride is None:
                    rows = crop_rows(events, start, room)
                    self.windows.append((rows, _labels(tokenizer, rows)))
                    continue
                end = min(start + stride, len(events))
                first = max(end - room, 0)
                rows = crop_rows(events, first, end - first)
                labels = _labels(tokenizer, rows)
                labels[1 : 1 + start - first] = IGNORE_INDEX  # context only
                self.windows.append((rows, labels))

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return _item([self.windows[index]], self.context_len)
