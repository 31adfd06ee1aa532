"""Autoregressive sampling shared by the id-based branches: temperature, top-k, nucleus.

The loop talks to a model through one call, `model(input_ids, past_key_values=...,
use_cache=...)` returning `.logits` and `.past_key_values` (the production and perceiver
models both speak it). With the cache, each step feeds one token; without it, each step
re-runs the window, which is the reference the cached path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm


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
    logits = logits.float() / cfg.temperature
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


@torch.no_grad()
def sample_tokens(
    model: nn.Module,
    prompt: torch.Tensor,  # (B, P) ids, P >= 1
    max_new_tokens: int,
    context_len: int,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    seconds_per_id: torch.Tensor | None = None,  # (V,) time each id advances, for `max_seconds`
    max_seconds: float | None = None,
    use_cache: bool = True,
    progress: bool = False,
    banned_ids: tuple[int, ...] = (),
    prefix_len: int = 0,
) -> torch.Tensor:
    """Sample up to `max_new_tokens` after `prompt`; returns (B, P + n) including the prompt.

    Stops when every row has emitted `eos_id` or covered `max_seconds` of music; `banned_ids`
    are never sampled (e.g. PAD and BOS, or EOS when a duration was asked for). Past the
    context, the cached path keeps the last half of the window and recomputes its cache with
    one forward (the window the model trained on), then continues one token at a time. The
    first `prefix_len` tokens (a style token) stay at the start of every window, as in
    training.
    """
    device = prompt.device
    seqs = prompt.clone()
    done = torch.zeros(prompt.size(0), dtype=torch.bool, device=device)
    elapsed = torch.zeros(prompt.size(0), device=device)
    past = None
    keep = max(context_len // 2, 1)

    def window(n: int) -> torch.Tensor:  # the last n tokens, behind the pinned prefix
        if prefix_len == 0 or seqs.size(1) <= n:
            return seqs[:, -n:]
        return torch.cat([seqs[:, :prefix_len], seqs[:, -(n - prefix_len):]], dim=1)

    banned = torch.tensor(banned_ids, dtype=torch.long, device=device)
    bar = tqdm(total=max_new_tokens, desc="sample", unit="tok", disable=not progress, leave=False)
    for _ in range(max_new_tokens):
        if use_cache:
            if past is None or past[0][0].size(2) >= context_len:
                out = model(window(keep if past is not None else context_len), use_cache=True)
            else:
                out = model(seqs[:, -1:], past_key_values=past, use_cache=True)
            past = out.past_key_values
        else:
            out = model(window(context_len))
        logits = out.logits[:, -1]
        if banned_ids:
            logits = logits.index_fill(-1, banned, float("-inf"))
        logits = filter_logits(logits, cfg)
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
        if eos_id is not None:
            nxt = nxt.masked_fill(done[:, None], eos_id)
            done |= nxt[:, 0] == eos_id
        seqs = torch.cat([seqs, nxt], dim=1)
        bar.update(1)
        if seconds_per_id is not None and max_seconds is not None:
            elapsed += seconds_per_id[nxt[:, 0]]
            done |= elapsed >= max_seconds
        if bool(done.all()):
            break
    bar.close()
    return seqs
