"""Piano-roll datasets for the diffusion branch: random training crops, evaluation windows, and
crops of latents encoded once.

Rolls are the pianoroll tokenizer's `(T, 88, 2)` uint8 arrays; items are float tensors
`(2, frames, 88)` under the key `x` (velocity / 127, onset), what `VQVAE` and
`LatentDiffusion` take. A crop that holds no note is drawn again (the reference drops empty
segments too): silence teaches an autoencoder nothing and a diffusion model only silence.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mehldau.data.dataset import NO_AUGMENTATION, Augmentation, CropDataset
from mehldau.tokenize.pianoroll import VELOCITY, PianoRollTokenizer, crop, roll_to_tensor


def count_frames(batch: dict[str, torch.Tensor]) -> int:
    """Frames in a batch of rolls (B, 2, T, 88): the unit of a roll model's loss."""
    x = batch["x"]
    return int(x.shape[0] * x.shape[2])


def count_latent_rows(batch: dict[str, torch.Tensor]) -> int:
    """Latent rows in a batch of latents (B, C, T', P')."""
    z = batch["z"]
    return int(z.shape[0] * z.shape[2])


class RollCropDataset(CropDataset):
    """Training crops of `frames` frames, augmented per crop (`augment`). A piece is chosen with
    probability proportional to its length; item i depends only on (seed, i), so resuming needs
    only a counter, as for the token datasets."""

    def __init__(self, rolls: Sequence[np.ndarray], frames: int,
                 tokenizer: PianoRollTokenizer, seed: int = 0,
                 augment: Augmentation = NO_AUGMENTATION, tries: int = 16) -> None:
        self.rolls = [r for r in rolls if len(r) and r[:, :, VELOCITY].any()]
        if not self.rolls:
            raise ValueError("RollCropDataset needs at least one roll with notes")
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self._init_crops([len(r) for r in self.rolls], seed)
        self.frames, self.tokenizer, self.augment, self.tries = frames, tokenizer, augment, tries

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        out = None
        for _ in range(self.tries):
            roll = self.rolls[self._pick(rng)]
            # Drawn even when not augmenting, and stretch first: a crop's start depends on it.
            stretch = float(rng.uniform(*self.augment.stretch))
            shift = int(rng.integers(-self.augment.transpose, self.augment.transpose + 1))
            # Cut a little more than needed before stretching, so the stretched crop is full.
            need = math.ceil(self.frames / stretch) + 1
            start = int(rng.integers(0, max(len(roll) - need, 0) + 1))
            part = crop(roll, start, need)
            if shift or stretch != 1.0:
                part = self.tokenizer.augment(part, transpose=shift, stretch=stretch)
            out = crop(part, 0, self.frames)
            if out[:, :, VELOCITY].any():
                break
        return {"x": roll_to_tensor(out)}


class RollWindowDataset(Dataset):
    """Evaluation: every roll cut into consecutive windows of `frames` (the last one padded with
    silence), windows without a note dropped; the same windows every time."""

    def __init__(self, rolls: Sequence[np.ndarray], frames: int) -> None:
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.frames = frames
        self.windows: list[np.ndarray] = []
        for roll in rolls:
            for start in range(0, len(roll), frames):
                w = crop(roll, start, frames)
                if w[:, :, VELOCITY].any():
                    self.windows.append(w)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": roll_to_tensor(self.windows[index])}


@torch.no_grad()
def encode_rolls(encode: Callable[[torch.Tensor], torch.Tensor], rolls: Sequence[np.ndarray],
                 chunk: int, time_factor: int, transpositions: Sequence[int] = (0,),
                 tokenizer: PianoRollTokenizer | None = None, batch_size: int = 16,
                 device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, np.ndarray]]:
    """Each roll (at each transposition) -> (latent (C, T', P') float32 on the CPU, activity
    (T',) bool: latent rows whose frames hold a sounding note).

    Rolls are cut into `chunk`-frame pieces (the last padded with silence), encoded in batches
    and joined along time, as the reference encodes its 1.28 s chunks; the encoder being
    convolutional, only the chunk borders see padding. Encoding the training set once, instead
    of every crop at every step, is what makes the diffusion stage affordable on a CPU."""
    # One roll (at one transposition) at a time: the split and its transposed copies are
    # never held at once, only the rolls whose chunks wait in the batch being filled.
    out: list[tuple[torch.Tensor, np.ndarray]] = []
    waiting: deque[tuple[np.ndarray, int, list[torch.Tensor]]] = deque()
    batch: list[np.ndarray] = []

    def finish() -> None:  # the rolls whose every chunk is encoded, in order
        while waiting and len(waiting[0][2]) == waiting[0][1]:
            r, _, zs = waiting.popleft()
            z = torch.cat(zs, dim=1)  # (C, n * chunk / f, P')
            rows = -(-len(r) // time_factor)
            sounding = np.zeros(rows * time_factor, bool)
            sounding[:len(r)] = r[:, :, VELOCITY].any(1)
            out.append((z[:, :rows], sounding.reshape(rows, time_factor).any(1)))

    def flush() -> None:
        z = encode(roll_to_tensor(np.stack(batch)).to(device)).float().cpu()
        batch.clear()
        for zi in z:  # each latent to the first roll still missing one, in chunk order
            next(zs for _, n, zs in waiting if len(zs) < n).append(zi)
        finish()

    for roll in rolls:
        for shift in transpositions:
            r = roll if shift == 0 else tokenizer.augment(roll, transpose=shift)
            n = -(-len(r) // chunk)
            waiting.append((r, n, []))
            for i in range(n):
                batch.append(crop(r, i * chunk, chunk))
                if len(batch) == batch_size:
                    flush()
    if batch:
        flush()
    finish()
    return out


class LatentCropDataset(CropDataset):
    """Diffusion training crops of `rows` latent rows from pre-encoded pieces (`encode_rolls`),
    a piece chosen in proportion to its length, crops without a sounding row drawn again;
    item i depends only on (seed, i)."""

    def __init__(self, latents: Sequence[tuple[torch.Tensor, np.ndarray]], rows: int,
                 seed: int = 0, tries: int = 16) -> None:
        self.latents = [(z, a) for z, a in latents if a.any()]
        if not self.latents:
            raise ValueError("LatentCropDataset needs at least one latent with notes")
        self._init_crops([z.shape[1] for z, _ in self.latents], seed)
        self.rows, self.tries = rows, tries

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = self._rng(index)
        for _ in range(self.tries):
            z, active = self.latents[self._pick(rng)]
            start = int(rng.integers(0, max(z.shape[1] - self.rows, 0) + 1))
            if active[start:start + self.rows].any():
                break
        out = torch.zeros(z.shape[0], self.rows, z.shape[2])
        part = z[:, start:start + self.rows]
        out[:, :part.shape[1]] = part  # a piece shorter than a crop: silence after it
        return {"z": out}


class FixedNoiseLatents(Dataset):
    """Validation latents with a fixed timestep and noise each, so the DDPM loss of one
    checkpoint is a number, not a draw."""

    def __init__(self, z: torch.Tensor, steps: int, seed: int) -> None:
        self.z, self.steps, self.seed = z, steps, seed

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return {"z": self.z[i], "t": torch.randint(0, self.steps, (), generator=g),
                "noise": torch.randn(self.z[i].shape, generator=g)}
