"""Autoregressive sampling shared by the id-based branches: temperature, top-k, nucleus.

The loop talks to a model through a `Decoder` (prefill a prompt, then one token per step),
so each architecture keeps its own cache rules: `KVCacheDecoder` here for the Music
Transformer, Perceiver AR's decoder in `nn/perceiver_ar.py`. Each decoder has an uncached
mode that re-runs the window, the reference its cached path is tested against.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn as nn
from torch import Tensor
from tqdm.auto import tqdm

from mehldau import jobs
from mehldau.nn.blocks import KVCache
from mehldau.nn.fused_step import FusedStep
from mehldau.nn.graphed_step import GraphedStep, graphed_step_for, graphs_wanted
from mehldau.nn.relative_attention import StaticKV

if TYPE_CHECKING:
    from mehldau.nn.perceiver_ar import PerceiverAR


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on the last axis; masked entries = -inf."""
    logits = logits.float()
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.size(-1):
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; the top one always stays.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p
        drop = drop_sorted.scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Decoder(Protocol):
    """Incremental next-token logits for a batch of sequences; holds its own caches."""

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, P): the whole prompt. Returns the next token's logits (B, V)."""

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,): appended to every row. Returns the next token's logits (B, V)."""


class KVCacheDecoder:
    """For models called as `model(ids, past_key_values=..., use_cache=...)` (the production
    Music Transformer): one token per step against a KV cache. Past the context, the cache is
    rebuilt by one forward over the last `keep` tokens, by default 7/8 of the window, so the
    context never drops below that. `use_cache=False` re-runs the last `context_len` tokens
    each step, a sliding window: the reference, which `keep = context_len - 1` equals exactly.
    The first `prefix_len` tokens (a style token) stay at the start of every window.

    `static` keeps the cache in buffers written in place (`StaticKV`), and `fused` then runs
    each one-token step through `FusedStep` (fused weights, the one-query relative term as a
    table slice); `static=False` (cache grown by concatenation, steps through the modules) is
    the plain path both are tested against. `graph` (by default on CUDA) runs that step as one
    recorded CUDA graph (`GraphedStep`); `graph=True` elsewhere runs the graph's masked step
    without recording it, the form it is tested in on a CPU.

    Why 7/8 and not half: on the tiny preset trained on real jazz piano, rebuilding from half
    a window made unprompted samples drift to ever shorter notes (median 0.37 s in their first
    10 s, 0.14 s after 20 s), while 7/8 held them (0.40 s, then 0.64 s) as the sliding window
    does; a rebuild every context/8 tokens costs about 7 token forwards per token, in parallel.
    """

    def __init__(self, model: nn.Module, context_len: int, use_cache: bool = True,
                 prefix_len: int = 0, keep: int | None = None, static: bool = True,
                 fused: bool = True, graph: bool | None = None) -> None:
        self.model, self.context_len = model, context_len
        self.use_cache, self.prefix_len = use_cache, prefix_len
        self.static = static
        self.fused = fused and static and use_cache
        self.graph = graph
        self.fast: FusedStep | GraphedStep | None = None
        self.keep = keep if keep is not None else max(context_len - context_len // 8, 1)
        if not max(prefix_len, 1) <= self.keep < max(context_len, 2):
            raise ValueError(f"keep must be in [max(prefix_len, 1), context_len), got "
                             f"{self.keep}")
        self.seqs: torch.Tensor | None = None
        self.past = None

    def _window(self, n: int) -> torch.Tensor:  # the last n tokens, behind the pinned prefix
        if self.prefix_len == 0 or self.seqs.size(1) <= n:
            return self.seqs[:, -n:]
        return torch.cat([self.seqs[:, :self.prefix_len],
                          self.seqs[:, -(n - self.prefix_len):]], dim=1)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        self.seqs, self.past = ids, None
        self.fast = _fast_step(self, self.fused, self.graph, ids,
                               [self.context_len] * len(self.model.layers))
        return self._next()

    def step(self, token: torch.Tensor) -> torch.Tensor:
        self.seqs = torch.cat([self.seqs, token[:, None]], dim=1)
        return self._next()

    def _next(self) -> torch.Tensor:
        if not self.use_cache:
            return self.model(self._window(self.context_len)).logits[:, -1]
        if self.past is None or self._cached() >= self.context_len:
            n = self.keep if self.past is not None else self.context_len
            out = self.model(self._window(n), use_cache=True)
            self.past = ([StaticKV(k, v, self.context_len) for k, v in out.past_key_values]
                         if self.static else out.past_key_values)
        elif self.fast is not None:
            return self.fast(self.seqs[:, -1], self.past)
        else:
            out = self.model(self.seqs[:, -1:], past_key_values=self.past, use_cache=True)
            self.past = out.past_key_values
        return out.logits[:, -1]

    def _cached(self) -> int:
        first = self.past[0]
        return first.length if isinstance(first, StaticKV) else first[0].size(2)


def _fast_step(decoder: object, fused: bool, graph: bool | None, ids: Tensor,
               capacities: list[int]) -> FusedStep | GraphedStep | None:
    """A decoder's one-token step: the graphed one where wanted and free, else the fused one,
    or None (the plain path) where the model cannot be fused."""
    model = decoder.model
    if not (fused and FusedStep.supports(model)):
        return None
    if graph if graph is not None else graphs_wanted(ids.device):
        capture = ids.device.type == "cuda"
        step = graphed_step_for(model, ids.size(0), capacities, decoder, capture)
        if step is not None:
            return step
    return FusedStep.for_model(model, ids.size(0))


def _logit_bias(vocab: int, banned_ids: tuple[int, ...], allowed_next: Tensor | None,
                device: torch.device) -> Tensor | None:
    """(V or 1, V) additive mask, 0 or -inf: row a = what may follow id a (all rows the same
    without a grammar), banned ids -inf everywhere. One indexed add per token, where masking
    the grammar and the banned ids separately took five operators."""
    if allowed_next is None and not banned_ids:
        return None
    allowed = (allowed_next.to(device) if allowed_next is not None
               else torch.ones(1, vocab, dtype=torch.bool, device=device))
    bias = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))
    if banned_ids:
        bias[:, list(banned_ids)] = float("-inf")
    return bias


@torch.no_grad()
def stream_tokens(
    decoder: Decoder,
    prompt: torch.Tensor,  # (B, P) ids, P >= 1
    max_new_tokens: int,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    seconds_per_id: torch.Tensor | None = None,  # (V,) time each id advances, for `max_seconds`
    max_seconds: float | None = None,
    banned_ids: tuple[int, ...] = (),
    allowed_next: torch.Tensor | None = None,  # (V, V) bool: row a = ids allowed after id a
) -> Iterator[torch.Tensor]:
    """Each step's new ids (B,), as they are sampled; `sample_tokens` collects them.

    Stops when every row has emitted `eos_id` or covered `max_seconds` of music; a finished
    row gets `eos_id` from then on. `banned_ids` are never sampled (PAD and BOS, style ids, or
    EOS when a duration was asked for). `allowed_next` (a tokenizer's `next_token_mask`)
    keeps every row inside the token grammar: only ids allowed after its last id are drawn.
    Stopping the iteration early stops the sampling: the decoder steps only when asked for
    the next ids. Nothing here reads a tensor on the host but the done check every 16 tokens
    (and the progress of a watching page).
    """
    device = prompt.device
    done = torch.zeros(prompt.size(0), dtype=torch.bool, device=device)
    elapsed = torch.zeros(prompt.size(0), device=device)
    last = prompt[:, -1]
    logits = decoder.prefill(prompt)
    bias = _logit_bias(logits.size(-1), banned_ids, allowed_next, device)
    for i in range(max_new_tokens):
        if bias is not None:
            logits = logits + (bias[last] if bias.size(0) > 1 else bias)
        nxt = torch.multinomial(filter_logits(logits, cfg).softmax(-1), 1, generator=generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(done[:, None], eos_id)
            done |= nxt[:, 0] == eos_id
        last = nxt[:, 0]
        if seconds_per_id is not None and max_seconds is not None:
            elapsed += seconds_per_id[last]
            done |= elapsed >= max_seconds
        yield last
        if jobs.active():  # a page is watching: report, and stop when asked (a host sync)
            jobs.step(float(elapsed.min()) / max_seconds if max_seconds else
                      (i + 1) / max_new_tokens)
        # One host sync every 16 tokens, not every token, to see whether all rows are done.
        if (i % 16 == 15 or i == max_new_tokens - 1) and bool(done.all()):
            return
        if i < max_new_tokens - 1:
            logits = decoder.step(last)


def sample_tokens(
    decoder: Decoder,
    prompt: torch.Tensor,  # (B, P) ids, P >= 1
    max_new_tokens: int,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    *,
    progress: bool = False,
    **options: Any,  # the rest of `stream_tokens`' settings: eos_id, max_seconds, ...
) -> torch.Tensor:
    """Sample up to `max_new_tokens` after `prompt` (`stream_tokens`, whose arguments these
    are); returns (B, P + n) including the prompt."""
    B, P = prompt.shape
    out = prompt.new_empty(B, P + max_new_tokens)  # written in place, not grown by cat
    out[:, :P] = prompt
    n = P
    with tqdm(total=max_new_tokens, desc="sample", unit="tok", disable=not progress,
              leave=False) as bar:
        for nxt in stream_tokens(decoder, prompt, max_new_tokens, cfg, generator, **options):
            out[:, n] = nxt
            n += 1
            bar.update(1)
    return out[:, :n]


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
    tested against). As in `KVCacheDecoder`, `static` keeps the caches in place-written
    buffers (the window's in layer 0, the latents' above it), `fused` steps through
    `FusedStep` and `graph` (by default on CUDA) through `GraphedStep`; `static=False` is the
    plain cached path. Put the model in eval mode first.
    """

    def __init__(self, model: PerceiverAR, use_cache: bool = True, prefix_len: int = 0,
                 static: bool = True, fused: bool = True, graph: bool | None = None) -> None:
        cfg = model.config
        self.model, self.use_cache, self.prefix_len = model, use_cache, prefix_len
        self.static = static and use_cache
        self.fused = fused and self.static
        self.graph = graph
        self.fast: FusedStep | GraphedStep | None = None
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
        layers = len(self.model.layers)
        self.fast = _fast_step(self, self.fused, self.graph, ids,
                               [self.max_len] + [self.max_latents] * (layers - 1))
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
        if self.fast is not None:
            return self.fast(token[:, 0], self.past)
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
        if self.static:  # room for the steps until the next refill, which a check makes first
            self.past = [StaticKV(k, v, self.max_len if i == 0 else self.max_latents)
                         for i, (k, v) in enumerate(self.past)]
        return out.logits[:, -1]  # (B, V)


# ----------------------------------------------------------------------------------------------
# Datasets: items are {"input_ids", "labels", "attention_mask"}, each of length M.
