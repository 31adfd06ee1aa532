"""Torch datasets over tokenized pieces: random crops for training, windows for evaluation.

Both work along axis 0 of each piece's array, so compound tokens `(T, 6)` and piano rolls
`(T, 88, C)` fit as well as 1-D ids. Training item `i` is a pure function of `(seed, i)`:
resuming a run only needs the index of the next sample, and the same run on one process or
several draws the same crops.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from mehldau.constants import IGNORE_INDEX
from mehldau.errors import UserError
from mehldau.tokenize.base import Tokenizer


@dataclass(frozen=True)
class Augmentation:
    """Music Transformer §4.2's data augmentation, drawn per training crop: a transposition
    uniform in [-transpose, +transpose] semitones and a time stretch uniform in `stretch`."""

    transpose: int = 0
    stretch: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        if self.transpose < 0:
            raise ValueError(f"transpose must be >= 0 semitones, got {self.transpose}")
        lo, hi = self.stretch
        if not 0 < lo <= hi:
            raise ValueError(f"the stretch range must satisfy 0 < min <= max, got {lo}..{hi}")

    @classmethod
    def from_config(cls, augment: Any) -> Augmentation:
        """From `cfg.augment` (transpose, stretch_min, stretch_max); bad values are a user
        error naming the keys."""
        try:
            return cls(int(augment.transpose),
                       (float(augment.stretch_min), float(augment.stretch_max)))
        except ValueError as e:
            raise UserError(f"bad augment config: {e}; set augment.transpose, "
                            "augment.stretch_min and augment.stretch_max") from e

    @property
    def active(self) -> bool:
        return self.transpose > 0 or self.stretch != (1.0, 1.0)

    def draw(self, rng: np.random.Generator) -> tuple[int, float]:
        """(semitones, time factor): the shift is drawn first, then the factor."""
        shift = int(rng.integers(-self.transpose, self.transpose + 1))
        return shift, float(rng.uniform(*self.stretch))


NO_AUGMENTATION = Augmentation()


def add_bos_eos(seq: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """Mark piece boundaries so generation can start from BOS and the model learns endings."""
    sp = tokenizer.special_tokens
    return np.concatenate([[sp["bos"]], seq, [sp["eos"]]]).astype(np.int64)


def crop_start(rng: np.random.Generator, length: int, take: int) -> int:
    """Start of a `take`-long crop of a `length`-long piece, such that every position is
    covered about equally often: uniform over all starts of windows that overlap the piece,
    clamped into it. Uniform over 0..length-take instead puts the first token (BOS) in one
    crop in length-take, and a model then hardly learns how pieces open, which is where
    every unprompted sample starts."""
    hi = max(length - take, 0)
    return int(np.clip(rng.integers(-(take - 1), hi + take), 0, hi))


def _pad_pair(window: np.ndarray, length: int, pad_id: int, prefix: np.ndarray | None = None
              ) -> dict[str, torch.Tensor]:
    """Inputs/labels of `length` from `prefix + window` (up to `length + 1` tokens), padded.

    The prefix (a style token) conditions every window; the token right after it is not a
    target, since it was the previous window's last target (or a crop's arbitrary start).
    """
    p = 0 if prefix is None else len(prefix)
    if p:
        window = np.concatenate([prefix, window[: length + 1 - p]])
    x = np.full(length, pad_id, dtype=np.int64)
    y = np.full(length, IGNORE_INDEX, dtype=np.int64)
    n = max(len(window) - 1, 0)
    x[:n] = window[:n]
    y[:n] = window[1 : n + 1]
    y[:p] = IGNORE_INDEX
    return {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y)}


class CropDataset(Dataset):
    """What every training crop dataset shares: item i is a pure function of (seed, i), so a
    resumed run needs only a sample counter (`CounterSampler`) and never runs out (`len` is
    2**62); each item draws its piece with probability proportional to the piece's length, so
    every second of music is equally likely to be trained on. Subclasses crop, augment and
    trim; they set `tokenizer` and `augment`, call `_init_crops(lengths, seed)`, then per
    item `_rng(index)`, `_pick(rng)`, `_take(want)` and `_augmented(crop, rng)`."""

    def _init_crops(self, lengths: Sequence[float], seed: int) -> None:
        if not len(lengths):
            raise ValueError(f"{type(self).__name__} needs at least one sequence")
        lengths = np.asarray(lengths, dtype=np.float64)
        self.probs = lengths / lengths.sum()
        self.seed = seed

    def __len__(self) -> int:
        return 2**62  # indexed by a global sample counter, never exhausted

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index])

    def _pick(self, rng: np.random.Generator) -> int:
        return int(rng.choice(len(self.probs), p=self.probs))

    def _take(self, want: int) -> int:
        """How much to crop for `want` tokens after augmenting: a little more, so a stretch
        that shortens the crop still fills it."""
        aug: Augmentation = self.augment
        return int(np.ceil(want / aug.stretch[0])) + 8 if aug.active else want

    def _augmented(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.augment.active:
            return crop
        shift, factor = self.augment.draw(rng)
        return self.tokenizer.augment(crop, transpose=shift, stretch=factor)


class RandomCropDataset(CropDataset):
    """Random crops of `context_len + 1` tokens, chosen with probability ∝ piece length, each
    position of a piece covered about equally often (`crop_start`).

    `augment` is applied to the crop at sampling time. The crop is taken a little longer
    than needed so a stretch that shortens it still fills the context.
    """

    def __init__(
        self,
        sequences: Sequence[np.ndarray],
        context_len: int,
        tokenizer: Tokenizer,
        seed: int = 0,
        augment: Augmentation = NO_AUGMENTATION,
        prefixes: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.sequences = list(sequences)
        self.prefixes = list(prefixes) if prefixes is not None else None
        self.context_len = context_len
        self.tokenizer = tokenizer
        self.augment = augment
        self._init_crops([len(s) for s in self.sequences], seed)
        self.pad_id = tokenizer.special_tokens["pad"]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        k = self._pick(rng)
        seq = self.sequences[k]
        prefix = self.prefixes[k] if self.prefixes is not None else None
        want = self.context_len + 1 - (0 if prefix is None else len(prefix))
        take = self._take(want)
        start = crop_start(rng, len(seq), take)
        window = self._augmented(seq[start : start + take], rng)
        return _pad_pair(window[:want], self.context_len, self.pad_id, prefix)


class WindowDataset(Dataset):
    """Evaluation windows: every token after a piece's first is predicted exactly once.

    Without `stride`: non-overlapping windows of `context_len` (what val loss uses; a token
    sees 0 to context_len - 1 tokens before it). With `stride`: each window holds the up to
    `context_len` tokens that end at its last target and labels only its last `stride`
    targets, so every token sees at least `context_len - stride` tokens before it (all of
    them near a piece's start): the scoring policy of `mehldau.evaluation.likelihood`.
    """

    def __init__(self, sequences: Sequence[np.ndarray], context_len: int, pad_id: int,
                 prefixes: Sequence[np.ndarray] | None = None, stride: int | None = None
                 ) -> None:
        self.context_len, self.pad_id, self.stride = context_len, pad_id, stride
        self.windows: list[tuple[np.ndarray, np.ndarray | None, int]] = []
        for i, s in enumerate(sequences):
            prefix = prefixes[i] if prefixes is not None else None
            room = context_len - (0 if prefix is None else len(prefix))
            if stride is None:
                for start in range(0, max(len(s) - 1, 1), room):
                    self.windows.append((s[start : start + room + 1], prefix, room))
                continue
            if not 0 < stride <= room:
                raise ValueError(f"stride must be in 1..{room}, got {stride}")
            for a in range(0, len(s) - 1, stride):  # targets s[a+1 : b+1]
                b = min(a + stride, len(s) - 1)
                self.windows.append((s[max(b - room, 0) : b + 1], prefix, b - a))

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window, prefix, n_targets = self.windows[index]
        item = _pad_pair(window, self.context_len, self.pad_id, prefix)
        if self.stride is not None:  # only the window's last n_targets are scored
            y = item["labels"]
            last = len(window) - 1 + (0 if prefix is None else len(prefix))
            y[: last - n_targets] = IGNORE_INDEX
        return item


class CounterSampler(Sampler[int]):
    """Yields global sample indices `start + k * world + rank`, forever.

    The trainer resumes by restarting this at the number of samples already consumed; each
    process of a multi-GPU run takes its own interleaved share.
    """

    def __init__(self, start: int = 0, rank: int = 0, world: int = 1) -> None:
        self.start, self.rank, self.world = start, rank, world

    def __iter__(self) -> Iterator[int]:
        i = self.start + self.rank
        while True:
            yield i
            i += self.world
