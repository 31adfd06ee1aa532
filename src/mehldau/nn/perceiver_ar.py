"""Perceiver AR (Hawthorne et al. 2022, arXiv 2202.07765) with Music Transformer relative attention.

The input is M' <= M tokens; its last N' <= N positions are the *latents*. Layer 0 is a causal
cross-attention: the latents' queries attend to all M' positions, each only to positions <= its
own. Layers 1..L-1 are causal self-attention over the N' latents only, so their cost does not
depend on M. Logits and loss exist for the latent positions only. With N' == M' the model is
exactly a plain causal Transformer with the same weights (`Block.cross` is `Block.forward` then).

Positions are relative only, no absolute embeddings: the cross layer adds Music Transformer
relative logits through the gather path of `RelativeSelfAttention` (the rectangular N' x M'
case: queries at positions M'-N'..M'-1 over keys 0..M'-1), the latent layers through the usual
skew (or flex) path over latent positions 0..N'-1. Why relative: a cached key means the same
thing wherever the window starts, so the cross layer's cache stays valid as the context grows,
and the latent caches stay valid after a refill. The published Perceiver AR models use rotary
embeddings instead; we use the Music Transformer table (distances >= max_relative_position get
a zero term, as in T2T) so both branches share one attention implementation.

Cache (`past_key_values`, a list with one (k, v) pair per layer, each (B, H, *, Dh)):
- entry 0, the cross layer: k/v of every position of the current input window. They are
  projections of the input embeddings alone (no other token enters them), so a new token only
  appends its own;
- entries 1..L-1: k/v of the current latents in each self-attention layer.
A cached call feeds T new tokens, all of them latents: layer 0 attends over the window cache
plus the new tokens, the others over their latent caches. `PerceiverDecoder` decides when the
caches are full and rebuilds them ("refill", see there).

Its training crops and evaluation windows live in `mehldau.data.perceiver_windows`, its cached
sampler (`PerceiverDecoder`) in `mehldau.sampling`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mehldau.constants import IGNORE_INDEX
from mehldau.nn import checkpointing
from mehldau.nn.blocks import CausalLMOutput, KVCache, decoder_parts, init_weights


@dataclass
class PerceiverARConfig:
    vocab_size: int = 311
    n_layers: int = 6  # layer 0 = cross-attention, 1..L-1 = self-attention over the latents
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    max_seq_len: int = 8192  # M: input positions (context + latents)
    num_latents: int = 1024  # N: the last N input positions, the only ones with a loss
    # Distances past this get a zero relative embedding (T2T).
    max_relative_position: int = 1024
    dropout: float = 0.1  # embeddings and residual branches
    attn_dropout: float = 0.0  # attention probabilities (off: flex on CUDA has none)
    activation: str = "gelu"  # "gelu" or "swiglu"
    attn_impl: str = "auto"  # latent layers: "auto", "skew", "flex", "sdpa"; cross: gather
    # Perceiver AR's "cross-attention dropout": in training, each prefix position (never a
    # latent) is dropped from the cross-attention keys with this probability.
    prefix_dropout: float = 0.1
    # Latents kept after a refill during sampling; 0 = Flaxformer's max(N - 128, N // 2, 1).
    refill: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "d_ff", "max_seq_len",
                     "num_latents", "max_relative_position"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.num_latents > self.max_seq_len:
            raise ValueError(f"num_latents {self.num_latents} exceeds max_seq_len "
                             f"{self.max_seq_len}")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise ValueError(f"prefix_dropout must be in [0, 1), got {self.prefix_dropout}")
        if not 0 <= self.refill <= self.num_latents:
            raise ValueError(f"refill must be in [0, num_latents], got {self.refill}")
        if self.activation not in ("gelu", "swiglu"):
            raise ValueError(f"activation must be gelu or swiglu, got {self.activation}")

    @property
    def refill_latents(self) -> int:
        """Latents kept after a refill (Flaxformer's `get_decoding_latent_reset_fill`)."""
        n = self.num_latents
        return self.refill or max(n - 128, n // 2, 1)

    def to_dict(self) -> dict:
        return asdict(self)


class PerceiverAR(nn.Module):
    branch = "perceiver_mt"
    activation_checkpointing = False  # `mehldau.nn.checkpointing`: recompute each block

    def __init__(self, cfg: PerceiverARConfig) -> None:
        super().__init__()
        self.config = cfg
        # Layer 0 of Perceiver AR is used through `Block.cross`: one block type for all.
        self.embed_tokens, self.drop, self.layers, self.norm, self.lm_head = decoder_parts(cfg)
        init_weights(self, cfg.n_layers)

    def _key_keep(self, attention_mask: Tensor | None, n_latents: int, x: Tensor
                  ) -> Tensor | None:
        """(B, M') bool keys of the cross layer to keep, or None for all.

        Padding (attention_mask False) and prefix dropout only ever hide prefix positions:
        every latent sees at least itself, so no softmax row is empty, and right padding
        inside the latents is harmless anyway (causality keeps it out of real positions).
        """
        B, M = x.shape[:2]
        P = M - n_latents
        drop = self.training and self.config.prefix_dropout > 0.0
        if P == 0 or (attention_mask is None and not drop):
            return None
        keep = torch.ones(B, M, dtype=torch.bool, device=x.device)  # (B, M')
        if attention_mask is not None:
            keep[:, :P] = attention_mask[:, :P].bool()
        if drop:  # independent per batch element and position
            keep[:, :P] &= torch.rand(B, P, device=x.device) >= self.config.prefix_dropout
        return keep

    def forward(
        self,
        input_ids: Tensor,  # (B, M')
        labels: Tensor | None = None,  # (B, M'), -100 = ignore; only the latents' count
        attention_mask: Tensor | None = None,  # (B, M') bool, False = (left) padding
        num_latents: int | None = None,  # N'; default config N, clipped to M'
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> CausalLMOutput:
        """Logits (B, N', V) for the last N' positions. With `past_key_values`, `input_ids`
        are T new tokens appended to the cached window, all of them latents (so N' = T)."""
        B, T = input_ids.shape
        recompute = self.activation_checkpointing and self.training and not use_cache
        x = self.drop(self.embed_tokens(input_ids))  # (B, T, C)
        if past_key_values is None:
            n = self.config.num_latents if num_latents is None else num_latents
            if n < 1:
                raise ValueError(f"num_latents must be >= 1, got {n}")
            n = min(n, T)
            key_keep = self._key_keep(attention_mask, n, x)
            x, present = checkpointing.run(recompute, self.layers[0].cross, x, n, key_keep,
                                           use_cache)  # (B, N', C)
        else:
            if attention_mask is not None or num_latents is not None:
                raise ValueError("with past_key_values every new token is a latent and the "
                                 "window holds no padding: drop attention_mask/num_latents")
            n = T
            # The new latents' queries over the cached window plus themselves: Block.forward's
            # cached path is the same causal (gather) attention as the cross layer.
            x, present = self.layers[0](x, past_key_values[0], use_cache)  # (B, T, C)
        presents: KVCache = [present]
        for i, layer in enumerate(self.layers[1:], start=1):
            past = past_key_values[i] if past_key_values is not None else None
            x, present = checkpointing.run(recompute, layer, x, past, use_cache)  # (B, N', C)
            presents.append(present)
        logits = self.lm_head(self.norm(x))  # (B, N', V)
        loss = None
        if labels is not None:
            y = labels[:, -n:]  # (B, N'): targets of the latent positions
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                   ignore_index=IGNORE_INDEX)
        return CausalLMOutput(logits, loss, presents if use_cache else None)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
