"""Music Transformer performance events (Oore et al. 2018; Huang et al. 2018), Magenta's layout.

One id per event, in Magenta's 88-key layout plus our three special ids:

    0 PAD, 1 BOS, 2 EOS | NOTE_ON x88 | NOTE_OFF x88 | TIME_SHIFT x100 | VELOCITY x32  = 311

Magenta's own table has PAD = 0, EOS = 1 and no BOS (310 ids): its ids are ours minus one past
EOS. A TIME_SHIFT of k (k = 1..100) moves the clock by k steps of 10 ms, so up to one second; longer
gaps take several. A VELOCITY event sets the loudness of the NOTE_ONs that follow it and is only
emitted when the velocity bin changes (bins as Magenta's, decoded to the bin's middle rather
than its lowest velocity). `encode` adds no BOS/EOS: the dataset decides.

Why hand-written and not miditok's `MIDILike`, which has the same four event kinds
(checked against miditok 3.1, `miditok/tokenizations/midi_like.py`):

- MIDILike's time shifts are in beats: the score is resampled to the tokenizer's beats
  resolution and `_add_time_events` converts tick gaps with `ticks_per_beat`. Music
  Transformer's shifts are absolute 10 ms steps, so rubato and tempo changes of a human
  performance stay in the tokens instead of depending on the file's tempo map (MIDILike can
  add Tempo tokens, but its shifts still count beats).
- MIDILike's decoder keeps unmatched NoteOns in a FIFO and drops them at the end unless
  `config.additional_params["max_duration"]` is set (then they get that duration); a sampled
  sequence often ends with notes still sounding, and we must close them at the final time. It
  also takes the token after every NoteOn as that note's velocity (`seq[ti + 1]`), where
  Magenta emits a VELOCITY event before the note-on and only when the bin changes.

symusic (the library under miditok) still does all MIDI reading and writing and the tick to
second conversion (`Score.to("second")`, which follows every tempo change).

Sustain pedal: it is folded into note durations, not emitted as events. Music Transformer's
vocabulary has no pedal events, folding keeps sequences short, and it is what the reference
did (Magenta's `sequences_lib.apply_sustain_control_changes`, per instrument). A key released
while CC64 is down (value >= 64, the threshold symusic also uses) keeps sounding until the pedal
is released or the same pitch is struck again, whichever comes first. Pedal spans are derived
from the raw CC64 events rather than from `Track.pedals`, because symusic drops a press that is
never released; such a press lasts to the end of the piece here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import symusic

from mehldau.errors import UserError
from mehldau.tokenize.base import Tokenizer, register
from mehldau.tokenize.notes import piano_score, score_notes

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2  # the id tokenizers' special tokens, first in the vocabulary
NUM_SPECIAL = 3
_DEFAULT_VELOCITY = 64  # for note-ons decoded before any VELOCITY event


@dataclass
class PerformanceConfig:
    min_pitch: int = 21  # lowest piano key (A0), Magenta's MIN_PITCH
    max_pitch: int = 108  # highest piano key (C8), Magenta's MAX_PITCH
    steps_per_second: int = 100  # time grid: 10 ms
    max_shift_steps: int = 100  # longest single TIME_SHIFT: 1 s
    num_velocity_bins: int = 32
    # A track with CC64 but fewer notes than pedal presses (a pedal-only track, as in files that
    # put the two hands on their own channels) also sustains the piano-family tracks that have no
    # CC64 of their own. False: each track is sustained by its own CC64 only, as MIDI channels are.
    shared_pedal: bool = True
    # Keep only piano-family tracks (GM programs 0-7) when a file has any with notes, so the bass
    # and guitar of a trio arrangement do not enter the piano stream; otherwise every non-drum
    # track is kept (files that put a piano on another program still read).
    piano_only: bool = True
    # Style (pianist) tokens, one id each after the velocity bins; prepended to training
    # sequences when style conditioning is on. Never produced by `encode`, ignored by `decode`.
    styles: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 <= self.min_pitch <= self.max_pitch <= 127:
            raise UserError(f"performance tokenizer: need 0 <= min_pitch <= max_pitch <= 127, "
                            f"got {self.min_pitch}..{self.max_pitch}")
        if not 1 <= self.steps_per_second <= 1000:
            raise UserError(f"performance tokenizer: steps_per_second must be in 1..1000, "
                            f"got {self.steps_per_second}")
        if self.max_shift_steps < 1:
            raise UserError(f"performance tokenizer: max_shift_steps must be >= 1, "
                            f"got {self.max_shift_steps}")
        if not 1 <= self.num_velocity_bins <= 127:
            raise UserError(f"performance tokenizer: num_velocity_bins must be in 1..127, "
                            f"got {self.num_velocity_bins}")


class IdTokenizer(Tokenizer):
    """What the one-id-per-token tokenizers (performance, duration) share: PAD, BOS and EOS
    first, then consecutive blocks of ids (`_lay_out`), the style block last."""

    _vocab_size: int

    def _lay_out(self, **sizes: int) -> None:
        """Set `<block>_offset` and `<block>_range` for each block, in the order given, after
        the special tokens; the vocabulary ends with the last block."""
        at = NUM_SPECIAL
        for block, size in sizes.items():
            setattr(self, f"{block}_offset", at)
            setattr(self, f"{block}_range", range(at, at + size))
            at += size
        self._vocab_size = at

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID}

    def augment(self, tokens: np.ndarray, transpose: int = 0, stretch: float = 1.0) -> np.ndarray:
        """Transpose by semitones and stretch time on an encoded sequence (or a crop).

        Notes pushed out of min_pitch..max_pitch lose all their events; a leading BOS and a
        trailing EOS are kept, other special or invalid ids dropped. How times are rescaled
        is each tokenizer's `_rebuild`."""
        if transpose == 0 and stretch == 1.0:
            return tokens
        head, raw, tail = split_ends(tokens, stretch)
        ev = self._parse(self._clean_ids(raw))
        pitch = ev["pitch"] + int(transpose)
        keep = (pitch >= self.config.min_pitch) & (pitch <= self.config.max_pitch)
        return np.concatenate([head, self._rebuild(ev, pitch, keep, stretch), tail])


@register
class PerformanceTokenizer(IdTokenizer):
    """Performance events: `encode(score) -> (T,) int64`, `decode(ids) -> Score`.

    Id layout (offsets are attributes, ranges are `range` objects):
    `note_on_range`, `note_off_range`, `time_shift_range` (k steps -> offset + k - 1) and
    `velocity_range` (bin b -> offset + b, bins 0-based).
    """

    name: ClassVar[str] = "performance"
    config_class: ClassVar[type] = PerformanceConfig

    def __init__(self, config: PerformanceConfig | None = None) -> None:
        self.config = config if config is not None else PerformanceConfig()
        c = self.config
        self.num_pitches = c.max_pitch - c.min_pitch + 1
        self._lay_out(note_on=self.num_pitches, note_off=self.num_pitches,
                      time_shift=c.max_shift_steps, velocity=c.num_velocity_bins,
                      style=len(c.styles))
        # Magenta's binning: bins of ceil(127 / n) velocities starting at 1.
        self.velocity_bin_size = math.ceil(127 / c.num_velocity_bins)
        # Decoded MIDI: 120 BPM, and a tick grid on which one step is a whole number of ticks.
        self.ticks_per_step = math.ceil(1000 / c.steps_per_second)
        if (c.steps_per_second * self.ticks_per_step) % 2:
            self.ticks_per_step *= 2
        self.decode_tpq = c.steps_per_second * self.ticks_per_step // 2  # 500 at 100 steps/s

    # --- id helpers ----------------------------------------------------------------------
    def note_on_id(self, pitch: int) -> int:
        return self.note_on_offset + self._pitch_index(pitch)

    def note_off_id(self, pitch: int) -> int:
        return self.note_off_offset + self._pitch_index(pitch)

    def time_shift_id(self, steps: int) -> int:
        if not 1 <= steps <= self.config.max_shift_steps:
            raise ValueError(f"time shift {steps} outside 1..{self.config.max_shift_steps}")
        return self.time_shift_offset + steps - 1

    def velocity_id(self, velocity_bin: int) -> int:
        if not 0 <= velocity_bin < self.config.num_velocity_bins:
            raise ValueError(f"velocity bin {velocity_bin} outside "
                             f"0..{self.config.num_velocity_bins - 1}")
        return self.velocity_offset + velocity_bin

    def velocity_to_bin(self, velocity: int | np.ndarray) -> int | np.ndarray:
        """MIDI velocity (1..127; 0 is read as 1) -> 0-based bin."""
        return (np.clip(velocity, 1, 127) - 1) // self.velocity_bin_size

    def bin_to_velocity(self, velocity_bin: int | np.ndarray) -> int | np.ndarray:
        """0-based bin -> the middle velocity of the bin."""
        return np.minimum(1 + velocity_bin * self.velocity_bin_size + self.velocity_bin_size // 2,
                          127)

    def id_to_event(self, token: int) -> tuple[str, int]:
        """One id -> (kind, value) for reading sequences: ('note_on', 60), ('time_shift', 25)..."""
        token = int(token)
        if token in (PAD_ID, BOS_ID, EOS_ID):
            return ({PAD_ID: "pad", BOS_ID: "bos", EOS_ID: "eos"}[token], 0)
        if token in self.note_on_range:
            return ("note_on", token - self.note_on_offset + self.config.min_pitch)
        if token in self.note_off_range:
            return ("note_off", token - self.note_off_offset + self.config.min_pitch)
        if token in self.time_shift_range:
            return ("time_shift", token - self.time_shift_offset + 1)
        if token in self.velocity_range:
            return ("velocity", token - self.velocity_offset)
        return ("unknown", token)

    def _pitch_index(self, pitch: int) -> int:
        if not self.config.min_pitch <= pitch <= self.config.max_pitch:
            raise ValueError(f"pitch {pitch} outside "
                             f"{self.config.min_pitch}..{self.config.max_pitch}")
        return pitch - self.config.min_pitch

    # --- encode --------------------------------------------------------------------------
    def encode(self, score: symusic.Score) -> np.ndarray:
        """Score (any time unit) -> (T,) int64 events; all non-drum tracks merged, pedal folded.

        Times are rounded to the step grid; notes outside min_pitch..max_pitch are dropped; a
        note shorter than one step lasts one step; of two overlapping notes of one pitch the
        earlier ends where the later begins. At one instant: note-offs, then note-ons (each
        preceded by a VELOCITY event when its bin differs from the last one emitted).
        """
        start, end, pitch, vbin = self.grid_notes(score)
        n = len(pitch)
        times = np.concatenate([end, start])
        is_on = np.concatenate([np.zeros(n, bool), np.ones(n, bool)])
        pitches = np.concatenate([pitch, pitch])
        vbins = np.concatenate([np.full(n, -1), vbin])
        order = np.lexsort((pitches, is_on, times))  # by time, offs first, then pitch
        return self._events_to_ids(times[order], is_on[order], pitches[order], vbins[order])

    def grid_notes(self, score: symusic.Score, bins: bool = True) -> tuple[np.ndarray, ...]:
        """Score -> (start, end, pitch, velocity bin) on the step grid (`bins=False`: MIDI
        velocity 1..127), cleaned by `clean_notes`: what `encode` writes as events."""
        start, end, pitch, velocity = self.score_notes(score)
        sps = self.config.steps_per_second
        start = np.floor(start * sps + 0.5).astype(np.int64)
        end = np.floor(end * sps + 0.5).astype(np.int64)
        velocity = np.clip(velocity, 1, 127).astype(np.int64)
        return self.clean_notes(start, end, pitch.astype(np.int64),
                                self.velocity_to_bin(velocity) if bins else velocity)

    def score_notes(self, score: symusic.Score) -> tuple[np.ndarray, ...]:
        """Notes in seconds, pedal folded: `mehldau.tokenize.notes.score_notes` with this
        tokenizer's `piano_only` and `shared_pedal`."""
        return score_notes(score, self.config.piano_only, self.config.shared_pedal)

    def clean_notes(self, start: np.ndarray, end: np.ndarray, pitch: np.ndarray,
                     vbin: np.ndarray) -> tuple[np.ndarray, ...]:
        """Step-grid notes -> in range, one step at least, no two of one pitch overlapping
        (of two, the earlier ends where the later begins); sorted by pitch, then start."""
        c = self.config
        keep = (pitch >= c.min_pitch) & (pitch <= c.max_pitch)
        start, end, pitch, vbin = start[keep], end[keep], pitch[keep], vbin[keep]
        order = np.lexsort((end, start, pitch))
        start, end, pitch, vbin = start[order], end[order], pitch[order], vbin[order]
        # Same pitch, same onset: keep the last in this order, i.e. the longest.
        dup = np.zeros(len(pitch), bool)
        dup[:-1] = (pitch[1:] == pitch[:-1]) & (start[1:] == start[:-1])
        start, end, pitch, vbin = start[~dup], end[~dup], pitch[~dup], vbin[~dup]
        end = np.maximum(end, start + 1)
        same = pitch[1:] == pitch[:-1]
        end[:-1] = np.where(same, np.minimum(end[:-1], start[1:]), end[:-1])
        return start, end, pitch, vbin

    def _events_to_ids(self, times: np.ndarray, is_on: np.ndarray, pitches: np.ndarray,
                       vbins: np.ndarray, end_time: int | None = None) -> np.ndarray:
        """Sorted events -> ids, with TIME_SHIFTs before and VELOCITY changes before note-ons.

        `vbins` holds each note-on's bin (-1: unknown, never emitted). `end_time` adds trailing
        shifts after the last event.
        """
        max_shift = self.config.max_shift_steps
        n = len(times)
        prev = np.concatenate([[0], times[:-1]])
        gap = times - prev  # (n,)
        if end_time is not None:
            gap = np.append(gap, max(0, end_time - (times[-1] if n else 0)))
        num_shifts = -(-gap // max_shift)  # ceil
        on_idx = np.flatnonzero(is_on)
        on_bins = vbins[on_idx]
        changed = on_bins != np.concatenate([[-1], on_bins[:-1]])
        has_vel = np.zeros(len(gap), np.int64)
        has_vel[on_idx[changed]] = 1
        has_event = np.zeros(len(gap), np.int64)
        has_event[:n] = 1
        length = num_shifts + has_vel + has_event
        first = np.cumsum(length) - length  # (n[+1],) position of each event's first token
        out = np.empty(int(length.sum()), np.int64)
        write_time_shifts(out, first, gap, num_shifts, self.time_shift_offset, max_shift)
        vi = np.flatnonzero(has_vel)
        out[first[vi] + num_shifts[vi]] = self.velocity_offset + vbins[vi]
        ev = np.arange(n)
        base = np.where(is_on, self.note_on_offset, self.note_off_offset)
        out[first[ev] + num_shifts[ev] + has_vel[ev]] = base + pitches - self.config.min_pitch
        return out

    # --- decode --------------------------------------------------------------------------
    def _parse(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Clean ids (no specials) -> per note event: position, time, pitch, on?, velocity bin."""
        is_shift = (ids >= self.time_shift_offset) & (ids < self.velocity_offset)
        is_vel = ids >= self.velocity_offset
        is_on = (ids >= self.note_on_offset) & (ids < self.note_off_offset)
        is_note = (ids >= self.note_on_offset) & (ids < self.time_shift_offset)
        time = np.cumsum(np.where(is_shift, ids - self.time_shift_offset + 1, 0))
        last_vel = np.maximum.accumulate(np.where(is_vel, np.arange(len(ids)), -1)) \
            if len(ids) else np.zeros(0, np.int64)
        vbin = np.where(last_vel >= 0, ids[np.maximum(last_vel, 0)] - self.velocity_offset, -1)
        pos = np.flatnonzero(is_note)
        pitch = np.where(is_on[pos], ids[pos] - self.note_on_offset,
                         ids[pos] - self.note_off_offset) + self.config.min_pitch
        return {"pos": pos, "time": time[pos], "pitch": pitch, "is_on": is_on[pos],
                "vbin": vbin[pos], "total": int(time[-1]) if len(ids) else 0}

    def _clean_ids(self, tokens: np.ndarray) -> np.ndarray:
        return clean_ids(tokens, NUM_SPECIAL, self.style_offset)

    def decode(self, tokens: np.ndarray) -> symusic.Score:
        """Ids -> one-track piano Score (ticks, 120 BPM, one step = `ticks_per_step` ticks).

        Never raises: specials and invalid ids are skipped. A note-on of a sounding pitch ends
        the earlier note; a note-off of a silent pitch is ignored; notes still sounding at the
        end are closed at the final time; every note lasts at least one step.
        """
        ev = self._parse(self._clean_ids(tokens))
        # Pair per pitch, in sequence order: a note-on ends at the next event of its pitch.
        order = np.lexsort((ev["pos"], ev["pitch"]))
        pitch, time, is_on, vbin = (ev[k][order] for k in ("pitch", "time", "is_on", "vbin"))
        same_next = np.zeros(len(pitch), bool)
        same_next[:-1] = pitch[1:] == pitch[:-1]
        nxt_time = np.append(time[1:], 0)
        end = np.where(same_next, nxt_time, ev["total"])
        start, end, pitch, vbin = time[is_on], end[is_on], pitch[is_on], vbin[is_on]
        end = np.maximum(end, start + 1)
        # Two note-ons of one pitch at one instant leave a zero-length note: drop it.
        same = np.zeros(len(pitch), bool)
        same[:-1] = pitch[1:] == pitch[:-1]
        end = np.where(same, np.minimum(end, np.append(start[1:], 0)), end)
        keep = end > start
        start, end, pitch, vbin = start[keep], end[keep], pitch[keep], vbin[keep]
        velocity = np.where(vbin >= 0, self.bin_to_velocity(np.maximum(vbin, 0)), _DEFAULT_VELOCITY)
        return piano_score(start, end, pitch, velocity, self.ticks_per_step, self.decode_tpq)

    # --- augmentation --------------------------------------------------------------------
    def seconds_per_id(self) -> np.ndarray:
        secs = np.zeros(self.vocab_size, dtype=np.float32)
        steps = np.arange(1, self.config.max_shift_steps + 1)
        secs[self.time_shift_offset:self.velocity_offset] = steps / self.config.steps_per_second
        return secs

    def _rebuild(self, ev: dict[str, np.ndarray], pitch: np.ndarray, keep: np.ndarray,
                 stretch: float) -> np.ndarray:
        """`augment`, vectorised: each kept event's absolute time (in steps) is multiplied by
        `stretch` and rounded; a note keeps one step at least, events of one instant are put
        back in `encode`'s order and VELOCITY events re-emitted where the bin changes, so the
        result equals encoding the transformed score up to one step of rounding. Works on
        crops too (orphan note-offs and open notes are kept)."""
        pitch, is_on, vbin, pos = pitch[keep], ev["is_on"][keep], ev["vbin"][keep], ev["pos"][keep]
        time = np.floor(ev["time"][keep] * stretch + 0.5).astype(np.int64)
        time = _keep_notes_open(time, pitch, is_on, pos)
        end_time = max(int(np.floor(ev["total"] * stretch + 0.5)), int(time.max(initial=0)))
        order = np.lexsort((pos, pitch, is_on, time))
        return self._events_to_ids(time[order], is_on[order], pitch[order],
                                   np.where(is_on, vbin, -1)[order], end_time=end_time)


# --- helpers ---------------------------------------------------------------------------------
def clean_ids(tokens: np.ndarray, low: int, high: int) -> np.ndarray:
    """Any array -> the 1-D int64 ids in low..high-1 (specials, styles and garbage dropped)."""
    try:
        ids = np.asarray(tokens)
        if ids.dtype.kind not in "iu":
            ids = np.nan_to_num(ids.astype(np.float64), nan=-1, posinf=-1, neginf=-1)
            ids = np.where(np.abs(ids) < 2**62, ids, -1)
        ids = ids.astype(np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        return np.zeros(0, np.int64)
    return ids[(ids >= low) & (ids < high)]


def split_ends(tokens: np.ndarray, stretch: float) -> tuple[np.ndarray, ...]:
    """For `augment`: (leading BOS or nothing, all ids, trailing EOS or nothing), after
    checking the stretch factor."""
    if not (math.isfinite(stretch) and stretch > 0):
        raise ValueError(f"stretch must be a positive finite number, got {stretch}")
    raw = np.asarray(tokens, dtype=np.int64).reshape(-1)
    head = raw[:1][raw[:1] == BOS_ID]
    tail = raw[-1:][raw[-1:] == EOS_ID] if len(raw) > len(head) else raw[:0]
    return head, raw, tail


def write_time_shifts(out: np.ndarray, first: np.ndarray, gap: np.ndarray,
                      num_shifts: np.ndarray, offset: int, max_shift: int) -> None:
    """Write event i's `num_shifts[i]` TIME_SHIFT ids covering `gap[i]` steps into `out` from
    position `first[i]`: full shifts of `max_shift` steps, then the remainder."""
    total = int(num_shifts.sum())
    if not total:
        return
    owner = np.repeat(np.arange(len(gap)), num_shifts)
    rank = np.arange(total) - np.repeat(np.cumsum(num_shifts) - num_shifts, num_shifts)
    out[first[owner] + rank] = offset + max_shift - 1
    has = num_shifts > 0
    last = gap[has] - (num_shifts[has] - 1) * max_shift  # 1..max_shift
    out[first[has] + num_shifts[has] - 1] = offset + last - 1


def _keep_notes_open(time: np.ndarray, pitch: np.ndarray, is_on: np.ndarray, pos: np.ndarray
                     ) -> np.ndarray:
    """Per pitch, make the event after a note-on come one step later at least (after rounding).

    Solves t'_i = max(t_i, t'_{i-1} + d_{i-1}) within each pitch, d = 1 after a note-on, as
    t' = D + cummax(t - D), D the running sum of d; a pitch offset keeps pitches apart.
    """
    if len(time) == 0:
        return time
    order = np.lexsort((pos, pitch))
    t, p, d = time[order], pitch[order], is_on[order].astype(np.int64)
    d_before = np.cumsum(d) - d
    group_start = np.ones(len(p), bool)
    group_start[1:] = p[1:] != p[:-1]
    d_before -= d_before[np.flatnonzero(group_start)][np.cumsum(group_start) - 1]
    big = int(t.max()) + len(t) + 2
    x = t - d_before + p * big
    fixed = np.maximum.accumulate(x) - p * big + d_before
    out = np.empty_like(time)
    out[order] = fixed
    return out
