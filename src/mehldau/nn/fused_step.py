"""One sampled token through a relative-attention decoder, with fused weights (sampling only).

A KV-cached step through the modules (`Block.forward`) is the plain path; this is the fast
one, tested to sample the same tokens. Per layer it does one fused q/k/v product, reads the
relative term for the single new query as a contiguous slice of the table, and skips what one
query at the end of the cache does not need (the causal mask: it may see every cached key;
the index gather of `relative_logits_gather`; dropout).

Why hand-written: no library we keep decodes Music Transformer relative attention, and the
layout of the weights matters on CPU. At batch 1 a step is matrix-vector products, bound by
reading the weights: with MKL on this project's 2-core CPU, `x @ W^T` stored transposed
(GPT-2's `Conv1D` layout) ran 1.3-1.5x faster than `F.linear(x, W)` for the base preset's
shapes, while at batch 8 `F.linear` was 1.5x faster (measured in one run each; see
`benchmarks/sampling.py`). So the fused weights are laid out by the batch they serve.

The weights are copied from the model when the step is built, kept on the model for the
next sample, and copied again once any parameter has changed: LoRA must be merged first (the
generate path loads merged models). A model whose projections are not plain `nn.Linear`
(peft-wrapped, 4-bit) is refused by `FusedStep.supports`, and the caller keeps the plain
path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mehldau.nn.relative_attention import StaticKV


def _linear(x: Tensor, wb: tuple[Tensor, Tensor | None], transposed: bool) -> Tensor:
    w, b = wb  # w: (out, in), or (in, out) when transposed
    if not transposed:
        return F.linear(x, w, b)
    return torch.addmm(b, x, w) if b is not None else x @ w


class _Layer:
    """One block's weights for a step: fused q/k/v, the output projection, the feed-forward
    (gate and up fused for SwiGLU), the two norms and the relative table."""

    def __init__(self, block: nn.Module, transpose: bool) -> None:
        a, m = block.attn, block.mlp
        self.heads, self.head_dim = a.n_heads, a.head_dim
        self.rel = a.rel_emb.detach() if a.impl != "sdpa" else None  # (H, R, Dh)
        self.ln1 = (block.ln_1.weight.detach(), block.ln_1.bias.detach(), block.ln_1.eps)
        self.ln2 = (block.ln_2.weight.detach(), block.ln_2.bias.detach(), block.ln_2.eps)
        self.swiglu = m.swiglu
        self.transpose = transpose
        self.qkv = self._pack([a.q_proj, a.k_proj, a.v_proj])  # (3C, C) or (C, 3C)
        self.o = self._pack([a.o_proj])
        self.up = self._pack([m.gate_proj, m.up_proj] if m.swiglu else [m.up_proj])
        self.down = self._pack([m.down_proj])

    def _pack(self, linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
        w = torch.cat([lin.weight.detach() for lin in linears])  # (out, in)
        b = None
        if linears[0].bias is not None:
            b = torch.cat([lin.bias.detach() for lin in linears])
        return (w.t().contiguous() if self.transpose else w), b

    def linear(self, x: Tensor, wb: tuple[Tensor, Tensor | None]) -> Tensor:
        return _linear(x, wb, self.transpose)

    def __call__(self, x: Tensor, cache: StaticKV) -> Tensor:
        """x (B, C): the new token's hidden state; its keys and values join `cache`."""
        B, C = x.shape
        H, Dh = self.heads, self.head_dim
        h = F.layer_norm(x, (C,), *self.ln1[:2], self.ln1[2])
        qkv = self.linear(h, self.qkv).view(B, 3, H, 1, Dh)
        q = qkv[:, 0] * Dh**-0.5  # (B, H, 1, Dh)
        k, v = cache.extend(qkv[:, 1], qkv[:, 2])  # (B, H, S, Dh), S = position + 1
        scores = q @ k.mT  # (B, H, 1, S)
        if self.rel is not None:
            # Key j is at distance S-1-j; table row R-1-d holds distance d, so the keys within
            # reach (the last min(S, R)) read the table's last rows in order: a slice.
            S, R = k.shape[2], self.rel.shape[1]
            n = min(S, R)
            # heads as the batch of one product: broadcasting q (B, H, 1, Dh) against the
            # table (H, Dh, n) would copy the table B times
            rel = torch.bmm(q.view(B, H, Dh).transpose(0, 1), self.rel[:, R - n:].mT)
            scores[..., S - n:] += rel.transpose(0, 1).unsqueeze(2)  # (B, H, 1, n)
        y = scores.softmax(-1) @ v  # (B, H, 1, Dh)
        x = x + self.linear(y.view(B, C), self.o)
        h = F.layer_norm(x, (C,), *self.ln2[:2], self.ln2[2])
        u = self.linear(h, self.up)
        if self.swiglu:
            gate, up = u.chunk(2, dim=-1)
            u = F.silu(gate) * up
        else:
            u = F.gelu(u)
        return x + self.linear(u, self.down)


class FusedStep:
    """next-token logits (B, V) for one new token per row, against per-layer `StaticKV`s.

    For the models built by `mehldau.nn.blocks.decoder_parts` (the Music Transformer and
    Perceiver AR, whose cached step runs every layer as a plain causal block)."""

    def __init__(self, model: nn.Module, rows: int) -> None:
        ref = model.lm_head.weight
        # CPU matrix-vector products are faster on transposed weights (module docstring)
        transpose = ref.device.type == "cpu" and rows == 1
        self.embed = model.embed_tokens.weight.detach()  # (V, C)
        self.layers = [_Layer(block, transpose) for block in model.layers]
        n = model.norm
        self.norm = (n.weight.detach(), n.bias.detach(), n.eps)
        self.transpose = transpose
        self.head = (ref.detach().t().contiguous() if transpose else ref.detach(), None)

    @classmethod
    def for_model(cls, model: nn.Module, rows: int) -> FusedStep:
        """The step for `model`, built once per layout and kept on the model: building copies
        every weight (0.4-1.2 s for the base preset on a busy 2-core CPU), which would otherwise
        delay every sample's first note. Rebuilt when any parameter has changed since, in
        place (its version counter) or replaced (its storage)."""
        transpose = model.lm_head.weight.device.type == "cpu" and rows == 1
        key = (transpose, tuple((p.data_ptr(), p._version, p.dtype) for p in model.parameters()))
        cached = model.__dict__.get("_fused_step")  # not a submodule: no state_dict entry
        if cached is not None and cached[0] == key:
            return cached[1]
        step = cls(model, rows)
        model.__dict__["_fused_step"] = (key, step)
        return step

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Plain linear projections, no dropout active: what the fused copy can stand for."""
        if model.training:
            return False
        for block in model.layers:
            parts = [block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.o_proj,
                     block.mlp.up_proj, block.mlp.down_proj]
            if block.mlp.swiglu:
                parts.append(block.mlp.gate_proj)
            if any(type(p) is not nn.Linear for p in parts):
                return False
        return type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding

    @torch.no_grad()
    def __call__(self, token: Tensor, caches: list[StaticKV]) -> Tensor:
        x = self.embed[token]  # (B, C)
        for layer, cache in zip(self.layers, caches):
            x = layer(x, cache)
        x = F.layer_norm(x, (x.shape[-1],), *self.norm[:2], self.norm[2])
        return _linear(x, self.head, self.transpose)  # (B, V)
