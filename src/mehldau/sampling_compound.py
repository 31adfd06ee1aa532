"""Sampling Moonbeam's compound tokens: a KV-cached backbone step, then six GRU steps per event.

Spec section 5. For each new event the backbone's last summary vector starts the GRU
sub-decoder, which emits Δonset, duration, octave, pitch class, instrument and velocity one
after another, each fed back as the next GRU input. Each attribute is sampled from its own
slice of the flat vocabulary: logits outside it are set to -inf *before* temperature, top-k
and top-p, which is the reference's rejection loop ("redraw until the id is in range") in
closed form, without its 15-second fallback. Values that cannot be a piano note are masked
the same way (duration 0, velocity 0, pitches outside `pitch_range`, the SOS classes, and the
EOS classes unless `allow_eos`), so every sampled row decodes to a note.

The backbone keeps a window of at most `context_len` rows. When it is full the window
restarts as SOS + its last half, re-based to onset 0 as the training crops are, and is
prefilled once (Moonbeam has no sequence positions, only onset-relative rotations, so the
re-based window means what it meant in training). `use_cache=False` re-runs the window every
step: the reference the cached path is tested against. The cache lives in buffers of
`context_len` positions written in place (`StaticKV`, `static=True`); `static=False` grows it
by concatenation, which copies the whole cache every event: the plain path the static one is
tested against, event for event.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from mehldau import jobs
from mehldau.nn.moonbeam import MoonbeamForCausalLM
from mehldau.nn.relative_attention import StaticKV
from mehldau.sampling import SamplingConfig, filter_logits
from mehldau.tokenize.compound import NUM_ATTRIBUTES, SOS

ONSET, DUR, OCTAVE, PITCH, INSTRUMENT, VELOCITY = range(NUM_ATTRIBUTES)


class EventDecoder:
    """Backbone state for a batch of row sequences: `prefill(rows)` then `step(row)`, each
    returning the summary vector (B, G) that starts the GRU for the next event. Rows come in
    with absolute onsets; the window holds them re-based to its first event."""

    def __init__(self, model: MoonbeamForCausalLM, context_len: int, use_cache: bool = True,
                 static: bool = True) -> None:
        if context_len < 4:
            raise ValueError(f"context_len must be >= 4, got {context_len}")
        self.model, self.context_len, self.use_cache = model, context_len, use_cache
        self.static = static  # the cache in buffers written in place; False: concatenated
        self.rows = torch.zeros(0)  # (B, n, 6): SOS first, then events re-based by `base`
        self.base = torch.zeros(0)  # (B,) absolute onset of the window's onset 0
        self.past = None

    @torch.no_grad()
    def prefill(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (B, n, 6): SOS first, onsets absolute."""
        self.rows = rows.clone()
        self.base = torch.zeros(rows.shape[0], dtype=torch.long, device=rows.device)
        if rows.shape[1] > self.context_len:
            return self._restart()
        return self._forward()

    @torch.no_grad()
    def step(self, row: torch.Tensor) -> torch.Tensor:
        """row (B, 6), onset absolute."""
        row = row.clone()
        row[:, ONSET] -= self.base
        self.rows = torch.cat([self.rows, row[:, None]], dim=1)
        if self.rows.shape[1] > self.context_len:
            return self._restart()
        if not self.use_cache:
            return self._forward()
        out = self.model(row[:, None], past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.summary[:, -1]

    def _restart(self) -> torch.Tensor:
        keep = self.rows[:, -(self.context_len // 2):].clone()  # events only (SOS is older)
        first = keep[:, 0, ONSET].clone()
        keep[..., ONSET] -= first[:, None]
        self.base = self.base + first
        self.rows = torch.cat([torch.full_like(keep[:, :1], SOS), keep], dim=1)
        return self._forward()

    def _forward(self) -> torch.Tensor:
        out = self.model(self.rows, use_cache=self.use_cache)
        self.past = out.past_key_values
        if self.use_cache and self.static:
            # the window never outgrows context_len rows (step restarts it first)
            self.past = [StaticKV(k, v, self.context_len) for k, v in self.past]
        return out.summary[:, -1]


@dataclass
class EventSampling:
    """Per-attribute sampling and the note constraints; `attribute` overrides `default`."""

    default: SamplingConfig
    attribute: dict[int, SamplingConfig] | None = None
    pitch_range: tuple[int, int] = (21, 108)  # the piano
    instrument: int | None = 0  # force this program (piano); None samples it
    allow_eos: bool = False  # let a sample end itself (the reference stops at EOS)

    def config(self, a: int) -> SamplingConfig:
        return (self.attribute or {}).get(a, self.default)


def _allowed(tokenizer, a: int, opts: EventSampling, octave: torch.Tensor | None,
             vocab: int, batch: int, device: torch.device) -> torch.Tensor:
    """(B, V) bool: the flat ids attribute `a` may take (for pitch class, given the octave).
    The EOS class stays allowed wherever `allow_eos` allowed it."""
    off, size = int(tokenizer.offsets[a]), int(tokenizer.sizes[a])
    lo, hi = {DUR: (1, size - 3), VELOCITY: (1, 127)}.get(a, (0, size - 3))
    raw = torch.arange(vocab, device=device) - off  # (V,) raw value of every flat id
    eos = (raw == size - 1) & opts.allow_eos
    ok = ((raw >= lo) & (raw <= hi))[None]  # (1, V)
    p_lo, p_hi = opts.pitch_range
    if a == OCTAVE:
        ok = ok & (raw >= p_lo // 12) & (raw <= p_hi // 12)
    elif a == PITCH and octave is not None:  # the whole pitch octave*12 + pc in range
        pitch = octave[:, None] * 12 + raw[None]  # (B, V)
        ok = ok & (pitch >= p_lo) & (pitch <= p_hi)
    elif a == INSTRUMENT and opts.instrument is not None:
        ok = ok & (raw == opts.instrument)
    return (ok | eos).expand(batch, vocab)


def _blocked_tables(tokenizer, opts: EventSampling, vocab: int, device: torch.device
                    ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The ids each attribute may not take, built once per call rather than per attribute
    and event: per attribute a (1, V) mask, and for pitch class an (octaves, V) table
    indexed by the sampled octave's raw value (every value it can take has a row)."""
    blocked = [~_allowed(tokenizer, a, opts, None, vocab, 1, device)
               for a in range(NUM_ATTRIBUTES)]
    octaves = torch.arange(int(tokenizer.sizes[OCTAVE]), device=device)
    pitch = ~_allowed(tokenizer, PITCH, opts, octaves, vocab, len(octaves), device)
    return blocked, pitch


@torch.no_grad()
def sample_events(model: MoonbeamForCausalLM, tokenizer, prompt: torch.Tensor,
                  max_events: int, opts: EventSampling, context_len: int,
                  generator: torch.Generator | None = None, max_ticks: int | None = None,
                  use_cache: bool = True, progress: bool = False, static: bool = True
                  ) -> list[np.ndarray]:
    """Continue `prompt` (B, n, 6): SOS first, absolute onsets. Returns per sample the prompt
    plus its new rows, absolute onsets, stopped at EOS (not included), `max_events` new rows,
    or the first row whose onset reaches `max_ticks`. `static`: see `EventDecoder`."""
    B, device = prompt.shape[0], prompt.device
    V = model.config.decode_vocab_size
    offsets = torch.as_tensor(tokenizer.offsets, device=device)
    eos = torch.as_tensor(tokenizer.eos_classes, device=device)
    decoder = EventDecoder(model, context_len, use_cache, static)
    blocked, blocked_pitch = _blocked_tables(tokenizer, opts, V, device)
    summary = decoder.prefill(prompt)
    onset = prompt[:, -1, ONSET].clamp(min=0)  # directly after a bare SOS the base is 0
    alive = torch.ones(B, dtype=torch.bool, device=device)
    rows, alive_at = [], []
    for k in tqdm(range(max_events), desc="sample", unit="event", disable=not progress):
        if jobs.active():  # a page is watching: report, and stop when asked (a host sync)
            jobs.step(max(k / max_events, float(onset.min()) / max_ticks if max_ticks else 0.0))
        ids = torch.zeros(B, 1, dtype=torch.long, device=device)  # sos_out
        h, raw = None, []
        for a in range(NUM_ATTRIBUTES):
            logits, h = model.decode(summary, ids, h)  # (B, 1, V)
            no = blocked_pitch[raw[OCTAVE]] if a == PITCH else blocked[a]  # (B or 1, V)
            logits = logits[:, -1].float().masked_fill(no, float("-inf"))
            probs = filter_logits(logits, opts.config(a)).softmax(-1)
            ids = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            raw.append(ids[:, 0] - offsets[a])
        row = torch.stack(raw, dim=1)  # (B, 6) raw values, Δonset first
        alive &= ~(row == eos).any(1)  # docs/moonbeam.md §5: an EOS class in any attribute ends it
        onset = onset + row[:, ONSET]
        row[:, ONSET] = onset
        rows.append(row)
        alive_at.append(alive.clone())
        if max_ticks is not None:
            alive &= onset < max_ticks
        if not alive.any():
            break
        summary = decoder.step(row)
    # One copy to the host for all rows, then numpy masks: indexing the tensors per sample
    # and event cost a host sync each on a GPU.
    head = prompt.cpu().numpy()
    if not rows:  # max_events 0
        return list(head)
    new = torch.stack(rows, 1).cpu().numpy()  # (B, N, 6)
    keep = torch.stack(alive_at, 1).cpu().numpy()  # (B, N)
    if max_ticks is not None:
        keep &= new[..., ONSET] < max_ticks
    return [np.concatenate([head[b], new[b][keep[b]]]) for b in range(B)]
