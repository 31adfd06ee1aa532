"""Diffusion Transformer (DiT; Peebles & Xie 2023, arXiv 2212.09748) over autoencoder latents.

The latent (B, C, H, W) = (B, C_lat, T', P') is cut into ph x pw patches, one token each, plus
a fixed 2-D sin-cos position embedding. Conditioning c = MLP(sinusoidal(t)) + label embedding
drives every block through adaLN-Zero: shift/scale/gate per block from c, the gates' linear
layer zero-initialised so each block starts as the identity, and a zero-initialised output
layer, so the untrained model predicts eps = 0. The label table has one extra row, the null
label (index num_classes), used for unconditional samples and dropped-in during training with
probability `class_dropout` for classifier-free guidance (as DiT's LabelEmbedder).

Differences from the SCG reference's DiTRotary-XL/8 (arXiv 2402.14285): absolute 2-D sin-cos
positions instead of rotary, and a conv patchify over any (ph, pw) instead of its 1-D MLP
patchify. With the default patch (1, 6) a 4 x 128 x 12 latent (10.24 s) gives 128 x 2 = 256
tokens, as many as the reference (2 per latent time step).
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
class DiTConfig:
    in_channels: int = 4
    patch_size: tuple[int, int] = (1, 6)  # (time, pitch) latent cells per token
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 0  # 0 = unconditional; else labels 0..n-1, null label = n
    class_dropout: float = 0.1  # training-time label -> null probability (CFG)
    freq_dim: int = 256  # sinusoidal timestep features before the MLP

    def __post_init__(self) -> None:
        self.patch_size = (int(self.patch_size[0]), int(self.patch_size[1]))
        for name in ("in_channels", "hidden_size", "depth", "num_heads", "freq_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if min(self.patch_size) <= 0:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.hidden_size % 4 or self.freq_dim % 2:
            raise ValueError("hidden_size must be a multiple of 4 (2-D sin-cos) and freq_dim even")
        if self.num_classes < 0 or not 0.0 <= self.class_dropout < 1.0 or self.mlp_ratio <= 0:
            raise ValueError("need num_classes >= 0, class_dropout in [0, 1), mlp_ratio > 0")

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer sinusoids of (possibly fractional) timesteps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Fixed 2-D position embedding (h*w, dim): half the channels encode the row, half the
    column (MAE/DiT's get_2d_sincos_pos_embed), row-major like the patch tokens."""
    def one_d(n: int) -> Tensor:  # (n, dim // 2)
        return timestep_embedding(torch.arange(n, device=device), dim // 2)
    rows = one_d(h)[:, None].expand(h, w, dim // 2)  # (h, w, dim/2)
    cols = one_d(w)[None].expand(h, w, dim // 2)  # (h, w, dim/2)
    return torch.cat([rows, cols], dim=-1).reshape(h * w, dim)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # (B, N, C), shift/scale (B, C)


class Attention(nn.Module):
    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d) for _ in range(3))
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape  # batch, tokens, width
        q, k, v = (p(x).view(B, N, self.n_heads, -1).transpose(1, 2)  # (B, H, N, Dh)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh), every token sees all
        return self.o_proj(y.transpose(1, 2).reshape(B, N, C))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)  # adaLN supplies it
        self.attn = Attention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        d_ff = int(d * cfg.mlp_ratio)
        self.up_proj, self.down_proj = nn.Linear(d, d_ff), nn.Linear(d_ff, d)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        h = F.gelu(self.up_proj(modulate(self.norm2(x), shift2, scale2)), approximate="tanh")
        return x + gate2[:, None] * self.down_proj(h)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d, (ph, pw) = cfg.hidden_size, cfg.patch_size
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, ph * pw * cfg.in_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, ph*pw*C)


class DiT(nn.Module):
    branch = "scg_diffusion"
    activation_checkpointing = False  # `mehldau.nn.checkpointing`: recompute each block

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.t_embed = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embed = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's init: xavier linears, patch conv as a linear, N(0, 0.02) embeddings; then
        adaLN-Zero (every modulation and the output projection start at zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.size(0), -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.t_embed[::2]:
            nn.init.normal_(m.weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        for mod in [b.adaLN_modulation for b in self.blocks] + [self.final.adaLN_modulation]:
            nn.init.zeros_(mod[-1].weight)
            nn.init.zeros_(mod[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def embed(self, x: Tensor) -> Tensor:
        """Latent (B, C, H, W) -> tokens (B, h*w, D) with positions, h = H/ph, w = W/pw."""
        (ph, pw), (H, W) = self.config.patch_size, x.shape[-2:]
        if x.dim() != 4 or x.size(1) != self.config.in_channels or H % ph or W % pw:
            raise ValueError(f"latent {tuple(x.shape)} does not fit in_channels "
                             f"{self.config.in_channels} and patch {(ph, pw)}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, h*w, D), row-major
        return tokens + sincos_2d(H // ph, W // pw, tokens.size(-1), x.device).to(tokens.dtype)

    def condition(self, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The conditioning vector c (B, D) from timesteps t (B,) and labels y (B,) or None
        (None = the null label: unconditional)."""
        freq = timestep_embedding(t, self.config.freq_dim)  # fp32 sinusoids, then the weights'
        c = self.t_embed(freq.to(self.t_embed[0].weight.dtype))  # (B, D)
        n = self.config.num_classes
        if self.y_embed is None:
            if y is not None:
                raise ValueError("labels given to a DiT with num_classes=0")
            return c
        if y is None:
            y = torch.full_like(t, n, dtype=torch.long)
        elif self.training and self.config.class_dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.config.class_dropout
            y = torch.where(drop, torch.full_like(y, n), y)
        return c + self.y_embed(y)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Predicted noise eps (B, C, H, W) for latents x (B, C, H, W) at timesteps t (B,)."""
        B, C, H, W = x.shape
        (ph, pw) = self.config.patch_size
        h = self.embed(x)  # (B, N, D)
        c = self.condition(t, y)  # (B, D)
        recompute = self.activation_checkpointing and self.training
        for block in self.blocks:
            h = checkpointing.run(recompute, block, h, c)
        out = self.final(h, c).view(B, H // ph, W // pw, ph, pw, C)  # (B, h, w, ph, pw, C)
        return torch.einsum("bhwpqc->bchpwq", out).reshape(B, C, H, W)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
