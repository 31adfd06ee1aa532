"""Piano-roll autoencoder for latent diffusion: a VQ-VAE (van den Oord et al. 2017,
arXiv 1711.00937) or, behind the same interface, a KL-VAE (the autoencoder the SCG reference
uses; Huang et al. 2024, arXiv 2402.14285, after Rombach et al. 2022, arXiv 2112.10752).

Input: rolls (B, 2, T, 88) in [0, 1]; channel 0 = velocity/127 on sounding frames, channel 1
= onset indicator, 100 frames/s. Downsampling is an explicit stride pattern, one (time, pitch)
stride per stage, each stage a residual block then a 3x3 conv with that stride. T must be a
multiple of the time factor. The 88 keys are zero-padded (silence, split evenly both sides)
to `pad_keys_to` = 96: 88 / 8 = 11 rows would be prime, leaving a DiT only whole-row or
single-cell pitch patches, while 12 rows take patches of 2, 3, 4 or 6 (at 9% more compute).
The default, three (2, 2) stages (f = 8 on both axes, as the reference's f8 KL-VAE), maps a
1024-frame (10.24 s) roll to a 4 x 128 x 12 latent and a 128-frame one to 4 x 16 x 12.

VQ: the codebook is learned by exponential moving averages (arXiv 1711.00937 App. A.1, decay
0.99) rather than by a codebook loss; only the commitment term beta*||z_e - sg(z_q)||^2 is a
loss, the decoder sees z_e + sg(z_q - z_e) (straight-through). The codebook is initialised
from the first training batch, and a code whose EMA usage (assignments per batch) falls below
`dead_threshold` is moved onto a random encoder output of the current batch (Jukebox's
revival, Dhariwal et al. 2020, arXiv 2005.00341), so codes never stay dead. With several
processes the EMA statistics (assignment counts and sums) are summed over all of them, so the
codebook learns from the global batch as one process would; the first-batch init and the
revivals draw from the main process's batch (DDP copies its buffers to the others).

Reconstruction: BCE on logits for both channels. For velocity the target is soft (v/127);
BCE's minimum is still at the target and, unlike MSE, its gradient does not vanish on the
sparse sounding cells when the output saturates near 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mehldau.nn import checkpointing


@dataclass
class VQVAEConfig:
    in_channels: int = 2
    keys: int = 88
    pad_keys_to: int = 96  # keys zero-padded to this; 0 = the next multiple of the pitch factor
    channels: tuple[int, ...] = (64, 128, 128)  # width of each stage, high to low resolution
    strides: tuple[tuple[int, int], ...] = ((2, 2), (2, 2), (2, 2))  # (time, pitch) per stage
    n_res: int = 1  # residual blocks per stage
    latent_channels: int = 4
    kind: str = "vq"  # "vq" or "kl"
    codebook_size: int = 512
    beta: float = 0.25  # commitment weight
    decay: float = 0.99  # codebook EMA decay
    dead_threshold: float = 1.0  # EMA assignments per batch below which a code is revived
    # KL weight with both terms summed per sample (as taming's loss), so 1e-2 means what the
    # reference's kl_weight means; the loss we report divides both by the roll's elements.
    kl_weight: float = 1e-2
    velocity_loss: str = "bce"  # "bce" or "mse" on channel 0
    # Weight of the positive (onset) cells in channel 1's BCE. Onsets are ~0.1 % of the cells,
    # and with weight 1 a small model learns to predict none (onset F1 0.0 on the demo corpus
    # after 150 steps); see the branch's README section for the figures.
    onset_weight: float = 1.0

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.strides = tuple((int(a), int(b)) for a, b in self.strides)
        if len(self.channels) != len(self.strides) or not self.channels:
            raise ValueError(f"channels and strides need one entry per stage, got "
                             f"{len(self.channels)} and {len(self.strides)}")
        if any(c <= 0 for c in self.channels) or any(s not in (1, 2) for st in self.strides
                                                        for s in st):
            raise ValueError("channels must be positive and strides 1 or 2")
        for name in ("in_channels", "keys", "latent_channels", "codebook_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_res < 0:
            raise ValueError(f"n_res must be >= 0, got {self.n_res}")
        if self.kind not in ("vq", "kl"):
            raise ValueError(f"kind must be vq or kl, got {self.kind}")
        if self.velocity_loss not in ("bce", "mse"):
            raise ValueError(f"velocity_loss must be bce or mse, got {self.velocity_loss}")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")
        if self.beta < 0 or self.kl_weight < 0 or self.dead_threshold < 0 or self.onset_weight <= 0:
            raise ValueError("beta, kl_weight and dead_threshold must be >= 0, onset_weight > 0")
        if self.pad_keys_to and (self.pad_keys_to < self.keys
                                 or self.pad_keys_to % self.pitch_factor):
            raise ValueError(f"pad_keys_to {self.pad_keys_to} must be >= keys {self.keys} and a "
                             f"multiple of the pitch factor {self.pitch_factor}")

    @property
    def time_factor(self) -> int:
        return math.prod(s[0] for s in self.strides)

    @property
    def pitch_factor(self) -> int:
        return math.prod(s[1] for s in self.strides)

    @property
    def padded_keys(self) -> int:
        return self.pad_keys_to or -(-self.keys // self.pitch_factor) * self.pitch_factor

    def latent_shape(self, frames: int) -> tuple[int, int, int]:
        """(C_lat, T', P') of the latent of a `frames`-long roll."""
        if frames % self.time_factor:
            raise ValueError(f"T={frames} is not a multiple of the time factor {self.time_factor}")
        return (self.latent_channels, frames // self.time_factor,
                self.padded_keys // self.pitch_factor)

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _stage(c_in: int, c_out: int, n_res: int) -> list[nn.Module]:
    return [ResBlock(c_in if i == 0 else c_out, c_out) for i in range(n_res)] or (
        [nn.Conv2d(c_in, c_out, 3, padding=1)] if c_in != c_out else [])


class Encoder(nn.Module):
    activation_checkpointing = False

    def __init__(self, cfg: VQVAEConfig, out_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.channels[0], 3, padding=1)]
        c = cfg.channels[0]
        for c_out, stride in zip(cfg.channels, cfg.strides):
            layers += _stage(c, c_out, cfg.n_res)
            layers.append(nn.Conv2d(c_out, c_out, 3, stride=stride, padding=1))  # /stride exactly
            c = c_out
        layers += [_norm(c), nn.SiLU(), nn.Conv2d(c, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return _layers(self, x)


def _layers(stack: nn.Module, x: Tensor) -> Tensor:
    """An encoder's or decoder's layers in turn, each recomputed in the backward pass when
    the stack's `activation_checkpointing` is on (`mehldau.nn.checkpointing`)."""
    recompute = stack.activation_checkpointing and stack.training
    for layer in stack.net:
        x = checkpointing.run(recompute, layer, x)
    return x


class Decoder(nn.Module):
    activation_checkpointing = False

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        c = cfg.channels[-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, c, 3, padding=1)]
        for c_out, stride in zip(cfg.channels[::-1], cfg.strides[::-1]):
            layers += _stage(c, c_out, cfg.n_res)
            # Nearest upsampling + conv rather than a transposed conv: no checkerboard on the
            # one-frame-wide onset lines.
            layers += [nn.Upsample(scale_factor=stride, mode="nearest"),
                       nn.Conv2d(c_out, c_out, 3, padding=1)]
            c = c_out
        layers += [_norm(c), nn.SiLU(), nn.Conv2d(c, cfg.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)
        # Rolls are sparse (a few % of cells sound): start the logits at that prior instead of
        # spending the first few hundred steps learning silence (Lin et al. 2017's prior init).
        nn.init.constant_(layers[-1].bias, -4.0)

    def forward(self, z: Tensor) -> Tensor:
        return _layers(self, z)


def _summed_over_processes(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Each tensor summed over the processes of a distributed run (unchanged in one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t)
    return tensors


class EMAQuantizer(nn.Module):
    """Nearest-code quantiser over the channel dim with an EMA codebook and dead-code revival."""

    def __init__(self, codebook_size: int, dim: int, decay: float = 0.99,
                 dead_threshold: float = 1.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.decay, self.dead_threshold, self.eps = decay, dead_threshold, eps
        self.register_buffer("embed", torch.randn(codebook_size, dim))  # (K, D)
        self.register_buffer("embed_avg", self.embed.clone())  # (K, D): EMA of assigned sums
        self.register_buffer("cluster_size", torch.zeros(codebook_size))  # (K,): EMA counts
        self.register_buffer("initted", torch.tensor(False))

    def codes(self, z: Tensor) -> Tensor:
        """Nearest code per position: z (B, D, H, W) -> (B, H, W) long."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.size(1)).float()  # (N, D)
        d = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t()
             + self.embed.pow(2).sum(1))  # (N, K)
        return d.argmin(1).view(z.size(0), z.size(2), z.size(3))

    def lookup(self, codes: Tensor) -> Tensor:
        return self.embed[codes].permute(0, 3, 1, 2).contiguous()  # (B, D, H, W)

    @torch.no_grad()
    def _init(self, flat: Tensor) -> None:
        """Start from real encoder outputs flat (N, D): a random init leaves most codes unused."""
        self.embed.copy_(flat[torch.randint(len(flat), (self.embed.size(0),), device=flat.device)])
        self.embed_avg.copy_(self.embed * self.dead_threshold)
        self.cluster_size.fill_(self.dead_threshold)
        self.initted.fill_(True)

    @torch.no_grad()
    def _update(self, flat: Tensor, onehot: Tensor) -> None:
        """One EMA step on the batch's encoder outputs flat (N, D), assignments onehot (N, K)."""
        K = self.embed.size(0)
        counts, sums = _summed_over_processes(onehot.sum(0), onehot.t() @ flat)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (n + K * self.eps) * n  # Laplace smoothing
        self.embed.copy_(self.embed_avg / size[:, None])
        dead = self.cluster_size < self.dead_threshold  # (K,)
        if dead.any():
            pick = flat[torch.randint(len(flat), (int(dead.sum()),), device=flat.device)]
            self.embed[dead] = pick
            self.embed_avg[dead] = pick * self.dead_threshold
            self.cluster_size[dead] = self.dead_threshold

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """z (B, D, H, W) -> (straight-through z_q, codes (B, H, W), commitment mse,
        perplexity, fraction of codes used in the batch). Updates the codebook in training."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.size(1)).float()  # (N, D)
        if self.training and not self.initted:
            self._init(flat.detach())
        codes = self.codes(z)  # (B, H, W)
        onehot = F.one_hot(codes.flatten(), self.embed.size(0)).float()  # (N, K)
        if self.training:
            self._update(flat.detach(), onehot)
        zq = self.lookup(codes).to(z.dtype)  # (B, D, H, W)
        commit = F.mse_loss(z, zq.detach())
        p = onehot.mean(0)  # (K,)
        perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum())
        usage = (p > 0).float().mean()
        return z + (zq - z).detach(), codes, commit, perplexity, usage

    def codebook_usage(self) -> float:
        """Fraction of codes whose EMA usage is at or above the revival threshold."""
        return (self.cluster_size >= self.dead_threshold).float().mean().item()


@dataclass
class VQVAEOutput:
    loss: Tensor  # recon_loss + latent_loss
    recon: Tensor  # (B, 2, T, 88) in [0, 1]
    recon_loss: Tensor  # mean BCE (or BCE + MSE) per roll element
    latent_loss: Tensor  # beta * commitment (vq) or weighted KL per roll element (kl)
    z: Tensor  # (B, C_lat, T', P'): what the decoder saw
    codes: Tensor | None = None  # (B, T', P') long, vq only
    perplexity: Tensor | None = None  # exp(entropy) of the batch's code histogram, vq only
    usage: Tensor | None = None  # fraction of the codebook used in the batch, vq only


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.config = cfg
        c_lat = cfg.latent_channels
        self.encoder = Encoder(cfg, 2 * c_lat if cfg.kind == "kl" else c_lat)  # kl: mean, logvar
        self.decoder = Decoder(cfg)
        self.quantizer = (EMAQuantizer(cfg.codebook_size, c_lat, cfg.decay, cfg.dead_threshold)
                          if cfg.kind == "vq" else None)
        self.pad = (cfg.padded_keys - cfg.keys) // 2  # keys padded on the low side

    def _encode(self, x: Tensor) -> Tensor:
        cfg = self.config
        if x.dim() != 4 or x.size(1) != cfg.in_channels or x.size(3) != cfg.keys:
            raise ValueError(f"expected rolls (B, {cfg.in_channels}, T, {cfg.keys}), got "
                             f"{tuple(x.shape)}")
        cfg.latent_shape(x.size(2))  # validates T
        x = F.pad(x, (self.pad, cfg.padded_keys - cfg.keys - self.pad))  # (B, 2, T, P_pad)
        return self.encoder(x)  # (B, C_lat or 2 C_lat, T', P')

    def encode(self, x: Tensor) -> Tensor:
        """The diffusion latent (B, C_lat, T', P'): quantised codes (vq) or the posterior mean
        (kl). No codebook update."""
        h = self._encode(x)
        if self.quantizer is None:
            return h.chunk(2, dim=1)[0]
        return self.quantizer.lookup(self.quantizer.codes(h)).to(h.dtype)

    def codes(self, x: Tensor) -> Tensor:
        """Codebook indices (B, T', P') of rolls x (vq only)."""
        if self.quantizer is None:
            raise ValueError("codes() needs kind='vq'")
        return self.quantizer.codes(self._encode(x))

    def decode_logits(self, z: Tensor) -> Tensor:
        lo = self.pad
        return self.decoder(z)[..., lo:lo + self.config.keys]  # (B, 2, T, 88)

    def decode(self, z: Tensor) -> Tensor:
        """Latent (B, C_lat, T', P') -> roll (B, 2, T, 88) in [0, 1]. A VQ latent is decoded
        as given (not re-quantised), so diffusion outputs between codes stay usable."""
        return self._probabilities(self.decode_logits(z))

    def _probabilities(self, logits: Tensor) -> Tensor:
        """Sigmoid, with the onset logit shifted by -log(onset_weight): the weighted BCE's
        optimum is logit = log(w p / (1 - p)), so this gives the calibrated p, and an onset is
        read (p > 0.5) where it is more likely than not. Unshifted, weight 20 read every cell
        with p > 1/21 as an onset: 15.7 onsets/s where the demo's validation rolls have 5.3."""
        if self.config.onset_weight == 1.0:
            return torch.sigmoid(logits)
        shift = torch.zeros(logits.size(1), 1, 1, device=logits.device, dtype=logits.dtype)
        shift[1] = math.log(self.config.onset_weight)
        return torch.sigmoid(logits - shift)

    def forward(self, x: Tensor) -> VQVAEOutput:
        cfg = self.config
        h = self._encode(x)
        codes = perplexity = usage = None
        if self.quantizer is not None:
            z, codes, commit, perplexity, usage = self.quantizer(h)
            latent_loss = cfg.beta * commit
        else:
            mean, logvar = h.chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.training else mean
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum()
            latent_loss = cfg.kl_weight * kl / x.numel()
        logits = self.decode_logits(z)  # (B, 2, T, 88)
        onset = F.binary_cross_entropy_with_logits(
            logits[:, 1], x[:, 1], pos_weight=torch.tensor(cfg.onset_weight, device=x.device))
        if cfg.velocity_loss == "bce":
            vel = F.binary_cross_entropy_with_logits(logits[:, 0], x[:, 0])
        else:
            vel = F.mse_loss(torch.sigmoid(logits[:, 0]), x[:, 0])
        recon_loss = (onset + vel) / 2
        return VQVAEOutput(recon_loss + latent_loss, self._probabilities(logits), recon_loss,
                           latent_loss, z, codes, perplexity, usage)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def note_f1(pred_roll: Tensor, target_roll: Tensor, threshold: float = 0.5, tolerance: int = 0,
            kind: str = "onset") -> float:
    """Micro-averaged F1 over a batch of rolls (B, 2, T, 88); both rolls are thresholded alike.

    kind="onset" (note-level, the default): a note is an onset cell (channel 1 > threshold) at
    a key; a predicted onset is correct if the target has an onset at the same key within
    +-tolerance frames, and a target onset is found if a predicted one is that close (matching
    is not one-to-one, which only matters for repeats closer than the tolerance).
    kind="frame": sounding cells, channel 0 > threshold. Channel 0 is velocity/127, so use a
    low threshold there (0.1 counts velocities >= 13 as sounding).
    """
    tp_p, tp_t, n_p, n_t = note_counts(pred_roll, target_roll, threshold, tolerance, kind)
    return f1_of(tp_p, tp_t, n_p, n_t)


def note_counts(pred_roll: Tensor, target_roll: Tensor, threshold: float = 0.5,
                tolerance: int = 0, kind: str = "onset") -> tuple[float, float, float, float]:
    """`note_f1`'s sums over a batch (predicted notes that are found, target notes that are
    found, predicted notes, target notes): added over batches, they give the F1 of all."""
    if kind not in ("onset", "frame"):
        raise ValueError(f"kind must be onset or frame, got {kind}")
    if kind == "onset":
        p, t = pred_roll[:, 1] > threshold, target_roll[:, 1] > threshold  # (B, T, 88)
    else:
        p, t = pred_roll[:, 0] > threshold, target_roll[:, 0] > threshold
    p, t = p.float(), t.float()
    if tolerance > 0:
        k = 2 * tolerance + 1
        near = lambda r: F.max_pool1d(r.transpose(1, 2), k, 1, tolerance).transpose(1, 2)  # noqa: E731
        tp_p, tp_t = (p * near(t)).sum(), (t * near(p)).sum()
    else:
        tp_p = tp_t = (p * t).sum()
    return float(tp_p), float(tp_t), float(p.sum()), float(t.sum())


def f1_of(tp_p: float, tp_t: float, n_p: float, n_t: float) -> float:
    """`note_f1` from `note_counts` (in float32, as computed over one batch)."""
    f32 = torch.float32
    precision = torch.tensor(tp_p, dtype=f32) / torch.tensor(max(n_p, 1.0), dtype=f32)
    recall = torch.tensor(tp_t, dtype=f32) / torch.tensor(max(n_t, 1.0), dtype=f32)
    return (2 * precision * recall / (precision + recall).clamp(min=1e-8)).item()


@torch.no_grad()
def reconstruction_report(model: VQVAE, windows, batch_size: int) -> dict[str, float]:
    """Onset note F1 (within one frame) of the reconstructions of `windows` (items with a
    roll "x"), and codebook usage (vq; NaN without a quantizer)."""
    model.eval()
    dev = next(model.parameters()).device
    # a batch at a time: the split's reconstructions are never held at once
    counts = [0.0, 0.0, 0.0, 0.0]
    for i in range(0, len(windows), batch_size):
        x = torch.stack([windows[j]["x"] for j in range(i, min(i + batch_size, len(windows)))])
        batch = note_counts(model(x.to(dev)).recon.cpu(), x, tolerance=1)
        counts = [a + b for a, b in zip(counts, batch)]
    report = {"note_f1": f1_of(*counts)}
    if model.quantizer is not None:
        report["codebook_usage"] = model.quantizer.codebook_usage()
    else:
        report["codebook_usage"] = float("nan")
    return report
