"""Music Transformer (Huang et al. 2018, arXiv 1809.04281): a decoder-only Transformer whose
self-attention adds a learned relative-position term, computed by skewing.

Pre-LN blocks (`mehldau.nn.blocks`), GELU or SwiGLU feed-forward, dropout on embeddings and
residual branches (attention-probability dropout is optional and off by default), untied
input/output embeddings as in the reference hyper-parameters.

Unlike the reference, no absolute sinusoidal signal is added: with positions only relative,
a cached key means the same thing wherever the window starts, which keeps KV-cached sampling
past the training length well-defined (`mehldau.sampling.KVCacheDecoder`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mehldau.nn import checkpointing
from mehldau.nn.blocks import CausalLMOutput, KVCache, decoder_parts, init_weights


@dataclass
class MusicTransformerConfig:
    vocab_size: int = 311
    n_layers: int = 6
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    max_seq_len: int = 2048  # training context length L
    # Distances past this get a zero relative embedding (T2T); the paper's code uses L / 2.
    max_relative_position: int = 1024
    dropout: float = 0.1  # embeddings and residual branches
    # Attention-probability dropout. 0 by default: the fused CUDA kernel (FlexAttention) has
    # none, and one setting should train the same model on every device.
    attn_dropout: float = 0.0
    activation: str = "gelu"  # "gelu" or "swiglu"
    # "auto" (fused flex on CUDA, skew elsewhere), "skew", "flex", or "sdpa" (no relative
    # term: the plain baseline for benchmarks)
    attn_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.activation not in ("gelu", "swiglu"):
            raise ValueError(f"activation must be gelu or swiglu, got {self.activation}")
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "d_ff", "max_seq_len",
                     "max_relative_position"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


class MusicTransformer(nn.Module):
    branch = "production"
    activation_checkpointing = False  # `mehldau.nn.checkpointing`: recompute each block

    def __init__(self, cfg: MusicTransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens, self.drop, self.layers, self.norm, self.lm_head = decoder_parts(cfg)
        init_weights(self, cfg.n_layers)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        labels: torch.Tensor | None = None,  # (B, T), -100 = ignore
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
    ) -> CausalLMOutput:
        x = self.drop(self.embed_tokens(input_ids))  # (B, T, C)
        presents: KVCache = []
        recompute = self.activation_checkpointing and self.training and not use_cache
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            x, present = checkpointing.run(recompute, layer, x, past, use_cache)
            if use_cache:
                presents.append(present)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                   ignore_index=-100)
        return CausalLMOutput(logits, loss, presents if use_cache else None)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
