"""The pre-LN Transformer block with relative self-attention, shared by the id-based models.

Pre-LN (more stable than the original post-LN at small batch sizes), GELU or SwiGLU
feed-forward with Llama names (`gate_proj`, `up_proj`, `down_proj`: LoRA targets), dropout on
the residual branches. Blocks take plain arguments, never a branch's config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mehldau.nn.relative_attention import RelativeSelfAttention

KV = tuple[torch.Tensor, torch.Tensor]  # one layer's cached keys and values
KVCache = list[KV]  # a model's, layer by layer


@dataclass
class CausalLMOutput:
    """What the id-based models return: the shape the trainer and the decoders expect."""

    logits: torch.Tensor  # (B, T, V): the positions with predictions
    loss: torch.Tensor | None = None  # mean cross-entropy over labelled positions, nats
    past_key_values: list[KV] | None = None


def decoder_parts(cfg) -> tuple[nn.Embedding, nn.Dropout, nn.ModuleList, nn.LayerNorm,
                                nn.Linear]:
    """The frame both id-based decoders share (Music Transformer, Perceiver AR): token
    embedding, embedding dropout, `n_layers` relative-attention Blocks, final norm, output head
    (untied). A builder, not a block: it reads the model config's fields by name (vocab_size,
    d_model, n_heads, d_ff, n_layers, max_relative_position, dropout, attn_dropout,
    activation, attn_impl); built in this order, so parameter names and initial values are
    what each model had when it built them itself."""
    embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
    drop = nn.Dropout(cfg.dropout)
    layers = nn.ModuleList(
        Block(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.max_relative_position, cfg.dropout,
              cfg.attn_dropout, cfg.activation, cfg.attn_impl) for _ in range(cfg.n_layers))
    return embed, drop, layers, nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model,
                                                                      cfg.vocab_size, bias=False)


def init_weights(model: nn.Module, n_layers: int) -> None:
    """GPT-2's init: normal(0.02) weights, zero biases, and residual output projections
    scaled by 1/sqrt(2 * n_layers) so early activations stay bounded with depth."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.normal_(p, std=0.02 / (2 * n_layers) ** 0.5)


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu") -> None:
        super().__init__()
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"activation must be gelu or swiglu, got {activation}")
        self.swiglu = activation == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x) if self.swiglu else F.gelu(self.up_proj(x))
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, max_relative_position: int,
                 dropout: float = 0.0, attn_dropout: float = 0.0, activation: str = "gelu",
                 attn_impl: str = "auto") -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = RelativeSelfAttention(d_model, n_heads, max_relative_position,
                                          dropout=attn_dropout, impl=attn_impl)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff, activation)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, past_kv: KV | None = None, use_cache: bool = False
                ) -> tuple[torch.Tensor, KV | None]:
        h, present = self.attn(self.ln_1(x), past_kv=past_kv, use_cache=use_cache)
        x = x + self.drop(h)
        x = x + self.drop(self.mlp(self.ln_2(x)))
        return x, present

    def cross(self, x: torch.Tensor, n_latents: int, key_keep: torch.Tensor | None = None,
              use_cache: bool = False) -> tuple[torch.Tensor, KV | None]:
        """Perceiver AR's first layer: the last `n_latents` positions of x (B, M, C) attend
        causally to all M; returns the latents' outputs (B, N, C). With N == M this is
        exactly `forward` (one set of weights serves both)."""
        h = self.ln_1(x)  # (B, M, C): keys and queries normalised alike
        P = x.size(1) - n_latents
        prefix = None
        if P > 0:
            k = self.attn._split_heads(self.attn.k_proj(h[:, :P]))  # (B, H, P, Dh)
            v = self.attn._split_heads(self.attn.v_proj(h[:, :P]))  # (B, H, P, Dh)
            prefix = (k, v)
        out, present = self.attn(h[:, P:], past_kv=prefix, use_cache=use_cache,
                                 key_keep=key_keep if P > 0 else None)
        lat = x[:, P:] + self.drop(out)
        lat = lat + self.drop(self.mlp(self.ln_2(lat)))
        return lat, present
