"""Perceiver AR's training crops and evaluation windows: targets only at the last N of M
positions (the latents); padding on the left, in the prefix part, except for pieces shorter
than the latent window, which are right-padded inside the latents.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mehldau.constants import IGNORE_INDEX
from mehldau.data.dataset import NO_AUGMENTATION, Augmentation, CropDataset
from mehldau.tokenize.base import Tokenizer


def _place(inputs: np.ndarray, labels: np.ndarray, max_seq_len: int, num_latents: int,
           pad_id: int) -> dict[str, Tensor]:
    """Put n <= M inputs (and their labels) into an M-long item whose last N are the latents.

    n >= N: left-aligned padding, all of it in the prefix part (the model masks it there).
    n < N: the inputs start at the first latent and are right-padded inside the latents, so
    no latent is left padding (the latent layers take no key mask; causality hides right pads).
    Labels outside the latents become IGNORE_INDEX.
    """
    M, N, n = max_seq_len, num_latents, len(inputs)
    o = M - max(n, N)  # first real position
    x = np.full(M, pad_id, dtype=np.int64)
    y = np.full(M, IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros(M, dtype=bool)
    x[o : o + n], y[o : o + n], mask[o : o + n] = inputs, labels, True
    y[: M - N] = IGNORE_INDEX  # targets only at the latent positions
    return {"input_ids": torch.from_numpy(x), "labels": torch.from_numpy(y),
            "attention_mask": torch.from_numpy(mask)}


def _check_sizes(max_seq_len: int, num_latents: int,
                 prefixes: Sequence[np.ndarray] | None) -> list[np.ndarray] | None:
    if not 0 < num_latents <= max_seq_len:
        raise ValueError(f"need 0 < num_latents <= max_seq_len, got {num_latents}, {max_seq_len}")
    if prefixes is None:
        return None
    prefixes = [np.asarray(p, dtype=np.int64) for p in prefixes]
    if any(len(p) > max_seq_len - num_latents for p in prefixes):
        raise ValueError("a prefix must fit before the latents (len <= max_seq_len - "
                         "num_latents)")
    return prefixes


class PerceiverCropDataset(CropDataset):
    """Training crops: N latent targets placed at random (Flaxformer's FULL_LATENTS).

    Item i is a pure function of (seed, i). A piece is chosen with probability ∝ its length;
    the end e of the target window is drawn so that every token is a target about equally
    often (uniform over the windows overlapping the piece, clamped to the ends that make all
    N targets real tokens); the inputs are the up-to-M tokens before and including the latent
    window, left padded. The style prefix (if any) sits at the first real position, never a target.
    Augmentation (`tokenizer.augment`) runs on a crop taken a little longer than needed, whose
    last tokens are kept, so the targets stay at its end. Pieces (or augmented crops) shorter
    than N + 1 tokens are right-padded inside the latents, the pads unlabelled.
    """

    def __init__(
        self,
        sequences: Sequence[np.ndarray],
        max_seq_len: int,
        num_latents: int,
        tokenizer: Tokenizer,
        seed: int = 0,
        augment: Augmentation = NO_AUGMENTATION,
        prefixes: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.prefixes = _check_sizes(max_seq_len, num_latents, prefixes)
        self.sequences = list(sequences)
        self.max_seq_len, self.num_latents = max_seq_len, num_latents
        self.tokenizer, self.augment = tokenizer, augment
        self._init_crops([len(s) for s in self.sequences], seed)
        self.pad_id = tokenizer.special_tokens["pad"]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        rng = self._rng(index)
        k = self._pick(rng)
        seq = self.sequences[k]
        prefix = self.prefixes[k] if self.prefixes is not None else np.zeros(0, np.int64)
        M, N, p = self.max_seq_len, self.num_latents, len(prefix)
        want = M + 1 - p  # piece tokens in one item: the inputs plus the last target
        # e = exclusive end of the targets s[e-N:e]; e >= N + 1 keeps all N of them real.
        # Uniform over every window that overlaps the piece, clamped into it, so each token
        # is a target about equally often (the opening too, where unprompted samples start).
        lo = min(N + 1, len(seq))
        e = int(np.clip(rng.integers(lo - N + 1, len(seq) + N), lo, len(seq)))
        take = self._take(want)
        window = self._augmented(seq[max(e - take, 0) : e], rng)
        full = np.concatenate([prefix, window[-want:]]).astype(np.int64)
        labels = full[1:].copy()
        labels[:p] = IGNORE_INDEX  # the prefix's label (the crop's first token) is no target
        return _place(full[:-1], labels, M, N, self.pad_id)


class PerceiverWindowDataset(Dataset):
    """Evaluation: every token after a piece's first is a target exactly once.

    Consecutive target windows of N tokens (the last one shorter); the inputs of each are the
    up-to-M tokens (prefix included) ending with the window's last input, so a full window has
    M - N - len(prefix) tokens of context and the last, shorter one a little more.
    """

    def __init__(self, sequences: Sequence[np.ndarray], max_seq_len: int, num_latents: int,
                 pad_id: int, prefixes: Sequence[np.ndarray] | None = None) -> None:
        self.prefixes = _check_sizes(max_seq_len, num_latents, prefixes)
        self.sequences = list(sequences)
        self.max_seq_len, self.num_latents, self.pad_id = max_seq_len, num_latents, pad_id
        self.windows: list[tuple[int, int, int]] = []  # (piece, a, b): targets s[a+1 : b+1]
        for k, s in enumerate(self.sequences):
            for a in range(0, len(s) - 1, num_latents):
                self.windows.append((k, a, min(a + num_latents, len(s) - 1)))

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        k, a, b = self.windows[index]
        s = np.asarray(self.sequences[k], dtype=np.int64)
        prefix = self.prefixes[k] if self.prefixes is not None else np.zeros(0, np.int64)
        ctx = self.max_seq_len - len(prefix)  # piece tokens that fit in the inputs
        inputs = np.concatenate([prefix, s[max(b - ctx, 0) : b]])
        labels = np.full(len(inputs), IGNORE_INDEX, dtype=np.int64)
        labels[len(inputs) - (b - a) :] = s[a + 1 : b + 1]
        return _place(inputs, labels, self.max_seq_len, self.num_latents, self.pad_id)

