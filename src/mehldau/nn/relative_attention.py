"""Music Transformer relative self-attention (causal, decoder-only).

Implements the relative attention of Huang et al., *Music Transformer* (arXiv 1809.04281),
which builds on Shaw et al., *Self-Attention with Relative Position Representations*
(arXiv 1803.02155). Each head's logits are

    (q_i . k_j + q_i . E_{i-j}) / sqrt(Dh)

where E is a learned table of per-distance embeddings. Shaw et al. gather an (L, L, Dh) tensor
of embeddings; Music Transformer gets the same numbers from an (L, L) matrix by "skewing"
(arXiv 1809.04281 section 3.4). Both are here, plus a gather for KV-cached decoding, which
neither the paper's code (tensor2tensor, "T2T") nor the public PyTorch ports implement.

Why hand-written: no library we keep (torch, transformers, ...) implements Music Transformer
relative attention with skewing, and the public ports keep E as an untrained tensor, share one
table across heads, clip far distances, or have no KV cache (see docs/implementation_notes.md,
"Relative attention: why learned per-head embeddings").

Conventions (T2T `get_relative_embeddings_left` / `dot_product_self_attention_relative_v2`):
- ``rel_emb`` has shape (H, R, Dh), one table per head (T2T's default
  ``heads_share_relative_embedding=False``); R = ``max_relative_position``.
- Row r of the table holds the embedding for distance d = i - j = (R - 1) - r: row R-1 is
  distance 0 (the token itself), row 0 the farthest distance R-1.
- Distances >= R get a *zero* embedding (T2T pads the table with zero rows), not Shaw's
  clipping to the farthest vector.
- Only j <= i is meaningful (causal); the relative term is scaled by 1/sqrt(Dh) together
  with q.k, as T2T scales q before both products.
"""

from __future__ import annotations

import functools
import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # FlexAttention: torch >= 2.5 (training with our learned score_mod table: >= 2.6)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    HAS_FLEX = True
except ImportError:  # pragma: no cover - depends on the installed torch
    HAS_FLEX = False

IMPLS = ("auto", "skew", "flex", "naive", "sdpa")

# Why FlexAttention could not run, once it failed (e.g. no Triton for this GPU): from then on
# impl="auto" takes the skew path, which computes the same numbers (tested equal).
_FLEX_FAILURE: str | None = None


def _fused_device(x: Tensor) -> bool:
    return x.is_cuda  # compiled FlexAttention is fused on CUDA only (eager elsewhere)


def _flex_failed(error: Exception) -> None:
    global _FLEX_FAILURE
    first = str(error).splitlines()[0][:200] if str(error) else ""
    _FLEX_FAILURE = f"{type(error).__name__}: {first}"
    print(f"attention: the fused FlexAttention path failed ({_FLEX_FAILURE}); attn_impl=auto "
          "uses the skew path from now on (same numbers, more memory)", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Relative logits: three ways to compute S_rel[i, j] = q_i . E_{i-j}


def relative_logits_naive(q: Tensor, rel_emb: Tensor) -> Tensor:
    """Shaw-style O(L^2 * Dh) reference: gather an (L, L, Dh) tensor of embeddings.

    q: (B, H, L, Dh); rel_emb: (H, R, Dh), row r = distance (R-1) - r.
    Returns S_rel (B, H, L, L): q_i . E_{i-j} for 0 <= i-j < R, else 0 (also 0 for j > i).
    Only for tests: this is the memory blow-up the skewing trick avoids.
    """
    L, R = q.shape[-2], rel_emb.shape[-2]
    pos = torch.arange(L, device=q.device)
    dist = pos[:, None] - pos[None, :]  # (L, L), i - j
    valid = (dist >= 0) & (dist < R)  # causal and within the table
    idx = (R - 1 - dist).clamp(0, R - 1)  # (L, L) row of rel_emb; clamped rows get zeroed
    emb = rel_emb[:, idx] * valid[None, :, :, None].to(rel_emb.dtype)  # (H, L, L, Dh)
    return torch.einsum("bhid,hijd->bhij", q, emb)  # (B, H, L, L)


def _left_embeddings(rel_emb: Tensor, length: int) -> Tensor:
    """T2T `get_relative_embeddings_left`: the (H, length, Dh) table E_r for a length-L sequence.

    Row r of the result is distance (length - 1) - r. A short table is padded with zero rows on
    the far side (distances >= R contribute 0); a long one keeps its nearest `length` rows.
    """
    R = rel_emb.shape[-2]
    if R < length:
        return F.pad(rel_emb, (0, 0, length - R, 0))  # (H, L, Dh), zero rows first
    return rel_emb[:, R - length :]  # (H, L, Dh)


def relative_logits_skew(q: Tensor, rel_emb: Tensor) -> Tensor:
    """Music Transformer skewing (arXiv 1809.04281 section 3.4): S_rel in O(L^2) memory.

    q: (B, H, L, Dh); rel_emb: (H, R, Dh). Returns (B, H, L, L) whose entries for j <= i equal
    `relative_logits_naive`. Entries above the diagonal (j > i) are ARBITRARY (they hold values
    wrapped around from the next row); callers must mask them with the causal mask.
    """
    B, H, L, _ = q.shape
    e_r = _left_embeddings(rel_emb, L)  # (H, L, Dh), row r = distance (L-1) - r
    qe = torch.einsum("bhld,hrd->bhlr", q, e_r)  # (B, H, L, L): [i, r] = q_i . E_{(L-1)-r}
    qe = F.pad(qe, (1, 0))  # (B, H, L, L+1): one zero column on the left
    qe = qe.reshape(B, H, L + 1, L)  # row-major reshape shifts row i left by i
    return qe[:, :, 1:, :]  # (B, H, L, L): [i, j] = qe[i, j - i + L - 1] = q_i . E_{i-j}


def relative_logits_gather(q: Tensor, rel_emb: Tensor, q_pos: Tensor, k_len: int) -> Tensor:
    """Relative logits for queries at absolute positions `q_pos` against keys 0..k_len-1.

    For KV-cached decoding (docs/implementation_notes.md, "KV cache with relative attention"):
    no skew and no prefix recompute.
    q: (B, H, Tq, Dh); rel_emb: (H, R, Dh); q_pos: LongTensor (Tq,). Returns (B, H, Tq, k_len),
    equal to rows `q_pos` of `relative_logits_naive` on the full sequence: q . E_{p-j} for
    0 <= p-j < R, else 0 (including j > p). Cost O(Tq * (R + k_len)) per head (plus Dh).
    """
    B, H, Tq, _ = q.shape
    R = rel_emb.shape[-2]
    u = torch.einsum("bhtd,hrd->bhtr", q, rel_emb)  # (B, H, Tq, R): q . every table row
    k_idx = torch.arange(k_len, device=q.device)
    dist = q_pos.to(q.device)[:, None] - k_idx[None, :]  # (Tq, k_len)
    valid = (dist >= 0) & (dist < R)
    idx = (R - 1 - dist).clamp(0, R - 1).expand(B, H, Tq, k_len)  # in-range for gather
    return torch.where(valid, u.gather(-1, idx), 0.0)  # (B, H, Tq, k_len)


# ----------------------------------------------------------------------------------------------
# FlexAttention helpers (GPU training / inference; forward-only on CPU, see
# docs/implementation_notes.md, "FlexAttention on CPU")


def _causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=16)
def _causal_block_mask(length: int, device: str):  # -> BlockMask
    # Building a block mask costs ~1 s the first time on CPU; reuse it across layers and steps.
    return create_block_mask(_causal, None, None, length, length, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    # Eager flex materialises the full score matrix ("unfused"); compiling fuses it on CUDA.
    # Default `dynamic` lets dynamo go shape-dynamic after a second sequence length (prompts).
    return torch.compile(flex_attention)


def _flex_relative_attention(q: Tensor, k: Tensor, v: Tensor, rel_emb: Tensor) -> Tensor:
    """Causal flex attention with the relative term added in `score_mod`. Returns (B, H, L, Dh)."""
    L, R = q.shape[-2], rel_emb.shape[-2]
    scale = q.shape[-1] ** -0.5
    qe = torch.einsum("bhld,hrd->bhlr", q, rel_emb) * scale  # (B, H, L, R), pre-scaled

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        # `score` is already q.k * scale; add q.E_{q_idx-kv_idx} * scale inside the table.
        dist = q_idx - kv_idx
        rel = qe[b, h, q_idx, (R - 1 - dist).clamp(0, R - 1)]  # clamp keeps the read in bounds
        return score + torch.where((dist >= 0) & (dist < R), rel, 0.0)

    block_mask = _causal_block_mask(L, str(q.device))
    attend = _compiled_flex() if q.is_cuda else flex_attention
    return attend(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


def _prefix_relative_attention(q: Tensor, k: Tensor, v: Tensor, rel_emb: Tensor, q_pos: Tensor,
                               allowed: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Queries at positions `q_pos` attend to keys 0..S-1 (a KV cache, or Perceiver AR's prefix).

    q: (B, H, T, Dh); k, v: (B, H, S, Dh); allowed: bool, broadcastable to (B, 1, T, S).
    Written out rather than through SDPA: SDPA would need the relative term as a dense float
    mask over all S keys, and a mask that needs a gradient sends CPU SDPA to its unfused math
    path, which allocates about twice as many (B, H, T, S) tensors as this. Here the relative
    term is added only on the band of keys it can reach (distances < R; beyond the table it is
    zero), fused into that band's q.k product.
    """
    S, R = k.shape[-2], rel_emb.shape[-2]
    scale = q.shape[-1] ** -0.5
    q = q * scale
    lo = max(0, int(q_pos[0]) - (R - 1))  # keys before lo are out of every query's reach
    band = relative_logits_gather(q, rel_emb, q_pos - lo, S - lo)  # (B, H, T, S-lo)
    near = torch.baddbmm(band.flatten(0, 1), q.flatten(0, 1), k[:, :, lo:].flatten(0, 1).mT)
    scores = near.view(band.shape)  # (B, H, T, S-lo)
    if lo > 0:  # far keys: q.k only; one concatenation, sliced (not copied) by its backward
        scores = torch.cat([q @ k[:, :, :lo].transpose(-2, -1), scores], dim=-1)  # (B,H,T,S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    att = scores.softmax(dim=-1)  # (B, H, T, S)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    return att @ v  # (B, H, T, Dh)


class StaticKV:
    """One layer's cached keys and values in buffers allocated once for `capacity` positions
    and written in place as tokens arrive. A cache grown by concatenation copies all of itself
    for every token: a third of CPU sampling time for the base preset (torch.profiler,
    `benchmarks/sampling.py --profile`). Attention reads views of the filled part, so the
    numbers are those of the concatenated cache."""

    def __init__(self, k: Tensor, v: Tensor, capacity: int) -> None:
        B, H, P, Dh = k.shape
        if P > capacity:
            raise ValueError(f"{P} cached positions do not fit a capacity of {capacity}")
        self.k = k.new_empty(B, H, capacity, Dh)  # (B, H, capacity, Dh)
        self.v = v.new_empty(B, H, capacity, Dh)
        self.k[:, :, :P], self.v[:, :, :P] = k, v
        self.length = P

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write T new positions (B, H, T, Dh) after the cached ones; the filled views."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"the cache holds {self.k.shape[2]} positions; rebuild it first")
        self.k[:, :, self.length:end], self.v[:, :, self.length:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, H, P+T, Dh)

    def append(self, k: Tensor, v: Tensor) -> int:
        """Write one position's keys and values, each (B, H, Dh), in place (a one-token step
        needs no views back); the number of cached positions after it."""
        end = self.length
        if end >= self.k.shape[2]:
            raise ValueError(f"the cache holds {self.k.shape[2]} positions; rebuild it first")
        self.k[:, :, end], self.v[:, :, end] = k, v
        self.length = end + 1
        return end + 1


# ----------------------------------------------------------------------------------------------
# The module


class RelativeSelfAttention(nn.Module):
    """Causal multi-head self-attention with Music Transformer relative positions and a KV cache.

    impl: "skew" (SDPA with the skewed relative term as a float mask; differentiable
    everywhere), "flex" (FlexAttention; compiled on CUDA, forward-only on CPU; no attention
    dropout), "naive" (Shaw gather + explicit softmax; tests only), "sdpa" (no relative term
    at all: the plain causal baseline that benchmarks compare against) or "auto" (flex on CUDA
    when available and no attention dropout is active, else skew).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        max_relative_position: int,
        dropout: float = 0.0,
        bias: bool = False,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        if max_relative_position < 1:
            raise ValueError(f"max_relative_position must be >= 1, got {max_relative_position}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if impl == "flex" and not HAS_FLEX:
            raise ValueError("impl='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.max_relative_position = max_relative_position
        self.dropout = dropout  # attention-probability dropout; residual dropout is the block's
        self.impl = impl
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        # A trained, saved parameter (unlike jason9693's port, where E is never trained and not
        # in the state_dict). Per-head tables; init std = head_dim**-0.5 as in T2T's
        # get_relative_embeddings_left.
        self.rel_emb = nn.Parameter(
            torch.randn(n_heads, max_relative_position, self.head_dim) * self.head_dim**-0.5
        )  # (H, R, Dh)

    def _resolve_impl(self, x: Tensor) -> str:
        if self.impl != "auto":
            return self.impl
        dropout_active = self.training and self.dropout > 0.0
        usable = _fused_device(x) and HAS_FLEX and _FLEX_FAILURE is None
        return "flex" if (usable and not dropout_active) else "skew"

    def _split_heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def forward(
        self,
        x: Tensor,
        past_kv: tuple[Tensor, Tensor] | StaticKV | None = None,
        use_cache: bool = False,
        key_keep: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """x: (B, T, C). past_kv: (k, v), each (B, H, P, Dh), for positions 0..P-1.

        With `past_kv` this is also causal cross-attention from T queries at positions
        P..P+T-1 to P+T keys (Perceiver AR's first layer). `key_keep` (B, P+T) bool, with
        `past_kv` only: keys to attend to (False drops a key, e.g. prefix dropout).
        Returns (y (B, T, C), present (k, v) each (B, H, P+T, Dh) if use_cache else None).
        """
        B, T, C = x.shape
        q = self._split_heads(self.q_proj(x))  # (B, H, T, Dh)
        k = self._split_heads(self.k_proj(x))  # (B, H, T, Dh)
        v = self._split_heads(self.v_proj(x))  # (B, H, T, Dh)
        scale = 1.0 / math.sqrt(self.head_dim)
        dropout_p = self.dropout if self.training else 0.0

        if past_kv is not None:
            # Incremental decoding: new queries sit at positions P..P+T-1 of the whole sequence.
            if isinstance(past_kv, StaticKV):
                P = past_kv.length
                k, v = past_kv.extend(k, v)  # (B, H, P+T, Dh), written in place
            else:
                P = past_kv[0].shape[2]
                k = torch.cat([past_kv[0], k], dim=2)  # (B, H, P+T, Dh)
                v = torch.cat([past_kv[1], v], dim=2)  # (B, H, P+T, Dh)
            S = P + T
            q_pos = torch.arange(P, S, device=x.device)  # (T,)
            allowed = torch.arange(S, device=x.device)[None, :] <= q_pos[:, None]  # (T, S)
            if key_keep is not None:
                allowed = allowed[None] & key_keep[:, None, :]  # (B, T, S)
            allowed = allowed.unsqueeze(-3)  # (B or 1, 1, T, S): the same for every head
            if self.impl == "sdpa":
                mask = torch.zeros(allowed.shape, device=x.device, dtype=q.dtype)
                mask = mask.masked_fill(~allowed, float("-inf"))
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
            else:
                y = _prefix_relative_attention(q, k, v, self.rel_emb, q_pos, allowed, dropout_p)
        else:
            impl = self._resolve_impl(x)
            if impl == "flex":
                if dropout_p > 0.0:
                    raise ValueError("impl='flex' has no attention dropout; use 'skew'")
                try:
                    y = _flex_relative_attention(q, k, v, self.rel_emb)  # (B, H, T, Dh)
                except Exception as e:  # compile or kernel failure: auto falls back, once
                    if self.impl != "auto":
                        raise
                    _flex_failed(e)
                    impl = "skew"
            if impl == "skew":
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
                s_rel = relative_logits_skew(q, self.rel_emb)  # (B, H, T, T), junk above diag
                # SDPA scales q.k itself and adds attn_mask afterwards, so pre-scale S_rel;
                # -inf hides the meaningless above-diagonal entries left by the skew.
                mask = (s_rel * scale).masked_fill(~causal, float("-inf"))
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
            elif impl == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
            elif impl == "naive":
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
                s_rel = relative_logits_naive(q, self.rel_emb)  # (B, H, T, T)
                att = (q @ k.transpose(-2, -1) + s_rel) * scale  # (B, H, T, T)
                att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
                att = F.dropout(att, p=dropout_p)
                y = att @ v  # (B, H, T, Dh)

        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): re-assemble heads
        present = None
        if use_cache:
            present = past_kv if isinstance(past_kv, StaticKV) else (k, v)
        return self.o_proj(y), present
