"""Latent diffusion over piano rolls (Rombach et al. 2022, arXiv 2112.10752, as the SCG
reference uses it): a frozen roll autoencoder (`mehldau.nn.vqvae`) maps a roll to a latent,
a DiT (`mehldau.nn.dit`) learns DDPM's eps-prediction on the scaled latent
(`mehldau.nn.diffusion`).

The latent is multiplied by `latent_scale` = 1 / (std of training latents), measured once
before the diffusion stage, so the DiT sees unit variance whatever the autoencoder's scale
(the reference's `scale_factor`, 1.2465 for its KL-VAE).

One module holds both parts so a checkpoint is self-contained (`mehldau-generate` needs no
second path); only the DiT trains: the autoencoder's parameters are frozen and it stays in
eval mode (its codebook never moves).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mehldau.nn.diffusion import Inpaint, NoiseSchedule
from mehldau.nn.dit import DiT, DiTConfig
from mehldau.nn.vqvae import VQVAE, VQVAEConfig
from mehldau.tokenize.pianoroll import clean_rolls


@dataclass
class LatentDiffusionConfig:
    autoencoder: dict[str, Any] = field(default_factory=dict)  # VQVAEConfig fields
    dit: dict[str, Any] = field(default_factory=dict)  # DiTConfig fields, in_channels implied
    frames: int = 1024  # roll frames of one sample (10.24 s at 100 fps)
    schedule: str = "linear"  # beta schedule: linear (the reference) or cosine
    diffusion_steps: int = 1000
    latent_scale: float = 1.0
    # Decoded cells quieter than this (velocity / 127) are silence: a decoder's output is never
    # exactly 0, and without a floor every faint cell would sound (the reference snaps values
    # below 0.025 of its range to silence; ours is higher, since no piano note is that quiet).
    velocity_floor: float = 0.08
    # Decoded rolls flicker and smudge; `pianoroll.clean_rolls` repairs them before rules and
    # MIDI see them: silences of up to `max_gap_frames` inside a key are filled, onset flags
    # within `restrike_frames` of a key's last start are no new note, notes shorter than
    # `min_note_frames` or never as loud as `min_note_peak` (velocity / 127) are dropped
    # (0, 0, 1, 0: off). Defaults measured on scg_tiny trained on real jazz piano: guided
    # 10.24 s samples went from 8.1x the human notes per second to 1.2x (polyphony 0.6x).
    max_gap_frames: int = 16
    restrike_frames: int = 20
    min_note_frames: int = 6
    min_note_peak: float = 0.4

    def __post_init__(self) -> None:
        ae = VQVAEConfig(**self.autoencoder)
        self.autoencoder = ae.to_dict()
        dit = DiTConfig(**{**self.dit, "in_channels": ae.latent_channels})
        self.dit = dit.to_dict()
        _, lt, lp = ae.latent_shape(self.frames)  # validates frames
        pt, pp = dit.patch_size
        if lt % pt or lp % pp:
            raise ValueError(f"the latent of {self.frames} frames is {lt} x {lp}; the DiT patch "
                             f"{(pt, pp)} must divide it")
        if not 0 <= self.velocity_floor < 1:
            raise ValueError(f"velocity_floor must be in [0, 1), got {self.velocity_floor}")
        if self.max_gap_frames < 0 or self.restrike_frames < 0 or self.min_note_frames < 1:
            raise ValueError("need max_gap_frames >= 0, restrike_frames >= 0 and "
                             f"min_note_frames >= 1, got {self.max_gap_frames}, "
                             f"{self.restrike_frames}, {self.min_note_frames}")
        if not 0 <= self.min_note_peak < 1:
            raise ValueError(f"min_note_peak must be in [0, 1), got {self.min_note_peak}")
        if not self.latent_scale > 0:
            raise ValueError(f"latent_scale must be positive, got {self.latent_scale}")
        NoiseSchedule(self.schedule, self.diffusion_steps)  # validates both

    @property
    def frame_multiple(self) -> int:
        """Roll lengths the model accepts are multiples of this (time factor x patch)."""
        return VQVAEConfig(**self.autoencoder).time_factor * self.dit["patch_size"][0]

    def latent_shape(self, frames: int | None = None) -> tuple[int, int, int]:
        return VQVAEConfig(**self.autoencoder).latent_shape(frames or self.frames)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LatentDiffusionOutput:
    loss: Tensor  # DDPM's simple loss: mean squared error of the predicted noise


class LatentDiffusion(nn.Module):
    def __init__(self, config: LatentDiffusionConfig) -> None:
        super().__init__()
        self.config = config
        self.autoencoder = VQVAE(VQVAEConfig(**config.autoencoder))
        self.autoencoder.requires_grad_(False)
        self.dit = DiT(DiTConfig(**config.dit))
        self.schedule = NoiseSchedule(config.schedule, config.diffusion_steps)

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.autoencoder.eval()  # frozen: no EMA codebook updates, no KL sampling
        return self

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Rolls (B, 2, T, 88) -> scaled latents (B, C, T', P')."""
        return self.autoencoder.encode(x) * self.config.latent_scale

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents (B, C, T', P') -> rolls (B, 2, T, 88) in [0, 1]: cells below the
        velocity floor silent (both channels), then `clean_rolls` with the config's repairs."""
        c = self.config
        rolls = self.autoencoder.decode(z / c.latent_scale)
        rolls = rolls * (rolls[:, :1] >= c.velocity_floor)
        if c.max_gap_frames or c.restrike_frames or c.min_note_frames > 1 or c.min_note_peak:
            rolls = clean_rolls(rolls, c.max_gap_frames, c.restrike_frames, c.min_note_frames,
                                c.min_note_peak)
        return rolls

    def forward(self, x: Tensor | None = None, z: Tensor | None = None, t: Tensor | None = None,
                noise: Tensor | None = None) -> LatentDiffusionOutput:
        """DDPM loss on rolls x (B, 2, T, 88), or on their scaled latents z (B, C, T', P')
        encoded beforehand (training encodes the corpus once). `t` (B,) and `noise` (like z)
        are drawn when not given; evaluation passes fixed ones so validation losses are
        comparable."""
        if z is None:
            if x is None:
                raise ValueError("give rolls x or latents z")
            z = self.encode(x)
        if t is None:
            t = torch.randint(0, self.schedule.steps, (z.size(0),), device=z.device)
        if noise is None:
            noise = torch.randn_like(z)
        eps = self.dit(self.schedule.q_sample(z, t, noise.to(z.dtype)), t)
        return LatentDiffusionOutput(F.mse_loss(eps.float(), noise.float()))

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def stitch(sample: Callable[[Inpaint, int], Tensor], known: Tensor, rows: int, window: int,
           context: int, multiple: int = 1) -> tuple[Tensor, list[tuple[int, int]]]:
    """Latents (B, C, >= rows, P) that begin with `known` (B, C, k, P; k may be 0), sampled
    window by window by inpainting: each window holds the last min(context, so far) rows of
    what precedes it and samples the rest, so it continues them. A piece that fits one
    window is one window of its length rounded up to `multiple` rows (the DiT's patch);
    otherwise every window is `window` rows (what the model was trained on).

    `sample(inpaint, start)` returns the window's latents (B, C, w, P), w =
    inpaint.known.size(2), starting at row `start`. Returns the latents and each window's
    (start, w)."""
    if not 0 <= context < window or window % multiple:
        raise ValueError(f"need 0 <= context < window, window a multiple of {multiple}; got "
                         f"context {context}, window {window}")
    out, windows = known, []
    while out.size(2) < rows:
        held = min(out.size(2), context)
        start = out.size(2) - held
        need = held + rows - out.size(2)
        w = -(-need // multiple) * multiple if start == 0 and need <= window else window
        buf = out.new_zeros(*out.shape[:2], w, *out.shape[3:])
        buf[:, :, :held] = out[:, :, start:]
        z = sample(Inpaint(buf, torch.arange(w) < held), start)
        out = torch.cat([out, z[:, :, held:]], dim=2)
        windows.append((start, w))
    return out, windows
