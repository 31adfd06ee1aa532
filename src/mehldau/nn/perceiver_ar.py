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

Training crops (`PerceiverCropDataset`) and evaluation windows (`PerceiverWindowDataset`) put
targets only at the last N of M positions; padding is on the left, in the prefix part, except
for pieces shorter than the latent window, which are right-padded inside the latents.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from mehldau.constants import IGNORE_INDEX
from mehldau.data.dataset import CropDataset
from mehldau.nn.blocks import CausalLMOutput, KVCache, decoder_parts, init_weights
from mehldau.tokenize.base import Tokenizer


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
        x = self.drop(self.embed_tokens(input_ids))  # (B, T, C)
        if past_key_values is None:
            n = self.config.num_latents if num_latents is None else num_latents
            if n < 1:
                raise ValueError(f"num_latents must be >= 1, got {n}")
            n = min(n, T)
            key_keep = self._key_keep(attention_mask, n, x)
            x, present = self.layers[0].cross(x, n, key_keep, use_cache)  # (B, N', C)
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
            x, present = layer(x, past, use_cache)  # (B, N', C)
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


class PerceiverDecoder:
    """Cached sampler state for one `PerceiverAR` (the `mehldau.sampling.Decoder` protocol).

    State over the token history h[0..t] (t = the last token):
    - the input window: h[s..t], behind the pinned prefix h[:prefix_len] once s > 0 (the style
      token stays at the start of every window, as in training);
    - the latents: the last `n_latents` positions of the window, h[l..t], l = t+1 - n_latents.
    Each `step` appends one token to both; layer 0 attends over the cached window, the latent
    layers over the cached latents. When the latents would exceed N or the window M, a
    *refill* (arXiv 2202.07765 Appendix E.3; Flaxformer's reset-fill) runs one full forward
    over a new window with n_latents = fill = config.refill or max(N - 128, N // 2, 1), and
    rebuilds every cache from it. The refill window is the last min(t+1, M - (N - fill))
    tokens (prefix included): it leaves room for exactly N - fill cached steps in both the
    window and the latents (then the next step refills), so past M the context dips by at
    most N - fill tokens, instead of a full-M refill at every step once the history passes M.
    (With this window the latent limit is always reached first or together with the window
    limit; the window check stays as a guard.)

    `use_cache=False` runs the same layout uncached at every step (the reference the cache is
    tested against). Put the model in eval mode first.
    """

    def __init__(self, model: PerceiverAR, use_cache: bool = True, prefix_len: int = 0) -> None:
        cfg = model.config
        self.model, self.use_cache, self.prefix_len = model, use_cache, prefix_len
        self.max_len, self.max_latents = cfg.max_seq_len, cfg.num_latents
        self.fill = cfg.refill_latents
        self.refill_len = self.max_len - (self.max_latents - self.fill)  # window after a refill
        if not 0 <= prefix_len < self.refill_len:
            raise ValueError(f"prefix_len must be in [0, {self.refill_len}), got {prefix_len}")
        self.history: Tensor | None = None  # (B, t+1)
        self.window_start = 0  # s
        self.n_latents = 0
        self.past: KVCache | None = None
        self.refills: list[tuple[int, int]] = []  # (history length, window start) per refill

    @property
    def latent_start(self) -> int:  # l, in history positions
        return self.history.size(1) - self.n_latents

    def window_len(self) -> int:
        n, s = self.history.size(1), self.window_start
        return n - s + (self.prefix_len if s > 0 else 0)

    def window(self) -> Tensor:
        """The current input window (B, W); its last `n_latents` positions are the latents."""
        s = self.window_start
        if s == 0 or self.prefix_len == 0:
            return self.history[:, s:]
        return torch.cat([self.history[:, :self.prefix_len], self.history[:, s:]], dim=1)

    @torch.no_grad()
    def prefill(self, ids: Tensor) -> Tensor:
        if ids.size(1) < max(self.prefix_len, 1):
            raise ValueError(f"the prompt needs at least max(prefix_len, 1) tokens, "
                             f"got {ids.size(1)}")
        self.history, self.past, self.refills = ids, None, []
        if ids.size(1) > self.max_latents:
            return self._refill()
        self.window_start, self.n_latents = 0, ids.size(1)  # all latents: a plain Transformer
        return self._run()

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        token = token.view(-1, 1).to(self.history)  # (B, 1)
        self.history = torch.cat([self.history, token], dim=1)
        if self.n_latents + 1 > self.max_latents or self.window_len() > self.max_len:
            return self._refill()
        self.n_latents += 1
        if not self.use_cache:
            return self._run()
        out = self.model(token, past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1]

    def _refill(self) -> Tensor:
        n = self.history.size(1)
        # The pinned prefix counts towards the window, so past it we keep refill_len - prefix.
        self.window_start = 0 if n <= self.refill_len else n - (self.refill_len - self.prefix_len)
        self.n_latents = min(self.fill, self.window_len())
        self.refills.append((n, self.window_start))
        return self._run()

    def _run(self) -> Tensor:  # one full forward over the current layout
        out = self.model(self.window(), num_latents=self.n_latents, use_cache=self.use_cache)
        self.past = out.past_key_values
        return out.logits[:, -1]  # (B, V)


# ----------------------------------------------------------------------------------------------
# Datasets: items are {"input_ids", "labels", "attention_mask"}, each of length M.


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
        transpose: int = 0,
        stretch: tuple[float, float] = (1.0, 1.0),
        prefixes: Sequence[np.ndarray] | None = None,
    ) -> None:
        if not sequences:
            raise ValueError("PerceiverCropDataset needs at least one sequence")
        self.prefixes = _check_sizes(max_seq_len, num_latents, prefixes)
        self.sequences = list(sequences)
        self.max_seq_len, self.num_latents = max_seq_len, num_latents
        self.tokenizer = tokenizer
        self.transpose, self.stretch = transpose, stretch
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
        augmenting = self.transpose > 0 or self.stretch != (1.0, 1.0)
        take = int(np.ceil(want / self.stretch[0])) + 8 if augmenting else want
        window = seq[max(e - take, 0) : e]
        if augmenting:
            shift = int(rng.integers(-self.transpose, self.transpose + 1))
            factor = float(rng.uniform(*self.stretch))
            window = self.tokenizer.augment(window, transpose=shift, stretch=factor)
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

