"""Moonbeam compound tokens (spec: docs/moonbeam.md, sections 3.1, 3.6 and 4).

One row of six integer attributes per note, in the reference's column order:

    [onset, duration, octave, pitch_class, instrument, velocity]

- onset: absolute onset in 10 ms ticks (`round(100 * seconds)`, half to even like Python's
  `round`); tempo is absorbed into real time by `symusic.Score.to("second")`;
- duration: `round(100 * (off - on))` from unrounded seconds, 0 becomes 1;
- octave `pitch // 12` (0..10), pitch class `pitch % 12` (0..11);
- instrument: the track's program (0..127), 128 for drum tracks (channel 9);
- velocity: the MIDI velocity, exact (1..127).

Rows are sorted by onset (unrounded seconds), ties by track order and then by symusic's note
order in the track, which approximates the reference's merged message order; there is no pitch
sort. Pedal and other controllers are ignored as in the reference (`fold_pedal=True` folds the
sustain pedal into durations with the performance tokenizer's helpers instead). symusic pairs
note-ons and note-offs itself, so the reference's "unclosed note lasts 25 ticks" rule is not
reproduced: symusic's own handling of unclosed notes applies.

`encode` returns the model input of spec 4.3: `[SOS] + events + [EOS]`, SOS the row `[-1]*6`
and EOS `[-2]*6`, onsets absolute. A file whose time shift (difference of consecutive onsets,
the first measured from 0) exceeds `max_shift = onset_vocab_size - 3` ticks is not dropped as
the reference drops it: by default (`long_gap="split"`) it is split at every such gap, each
later chunk's onsets re-based to start at 0 (like the reference's `--ts_threshold`), and the
chunks are concatenated as `[SOS] chunk [EOS] [SOS] chunk [EOS] ...`; a leading silence longer
than `max_shift` is cut (the first chunk re-based to 0 as well). `long_gap="clamp"` shortens
each long gap to `max_shift` ticks instead and `long_gap="drop"` returns an empty `(0, 6)` array
for such files, as the reference does. Durations longer than `max_dur = dur_vocab_size - 3`
are always clamped to `max_dur` (a note cannot be split). `encode_with_stats` reports how many
gaps were split or clamped and how many durations were clamped.

Labels (spec 4.3 / 3.6): `to_labels(rows)` gives a `(T, 7)` array of flat output ids,
`[sos_out, Δonset, dur, oct, pc, instr, vel]` with `sos_out` = id 0 in every row and raw value
v of attribute a at `offsets[a] + v`. The SOS row gets every attribute's SOS class (size-2),
the EOS row every attribute's EOS class (size-1), pad rows `[-3]*6` the all-zero label. Δonset
is measured from the previous event of the same sample, from 0 after SOS. `from_labels` inverts
it. `vocab_size` is the flat output vocabulary (`decode_vocab_size`: 8487 for 839M, 2341 for
309M).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import symusic

from mehldau.errors import UserError
from mehldau.tokenize.base import Tokenizer, register
from mehldau.tokenize.notes import SUSTAIN_CC, fold_pedal, pedal_spans

SOS, EOS, PAD = -1, -2, -3  # row markers: the row is the value repeated six times
SOS_OUT_ID = 0  # flat id fed as the first GRU input, column 0 of every label row
NUM_ATTRIBUTES = 6
OCTAVE_VOCAB, PITCH_CLASS_VOCAB, INSTRUMENT_VOCAB, VELOCITY_VOCAB = 13, 14, 131, 130
DRUM_INSTRUMENT = 128
_DECODE_TPQ = 50  # with 120 BPM one tick is 10 ms, as the reference's compound_to_midi
_DECODE_QPM = 120.0
_LONG_GAP = ("split", "clamp", "drop")
# Per released checkpoint (spec section 2, "Per-config values").
PRESETS: dict[str, dict[str, int]] = {
    "839M": {"onset_vocab_size": 4099, "dur_vocab_size": 4099},
    "309M": {"onset_vocab_size": 1026, "dur_vocab_size": 1026},
}


@dataclass
class CompoundConfig:
    # Defaults: the 839M release. The 309M release uses 1026 for both (see PRESETS).
    onset_vocab_size: int = 4099  # Δonset classes incl. the SOS/EOS classes; max shift = size-3
    dur_vocab_size: int = 4099  # duration classes incl. the SOS/EOS classes; max = size-3
    ticks_per_second: int = 100  # the reference's TIME_RESOLUTION: 10 ms ticks
    long_gap: str = "split"  # "split" | "clamp" | "drop" (the reference drops the file)
    fold_pedal: bool = False  # the reference ignores CC64

    def __post_init__(self) -> None:
        for key in ("onset_vocab_size", "dur_vocab_size"):
            if int(getattr(self, key)) < 4:
                raise UserError(f"moonbeam tokenizer: {key} must be >= 4, got {getattr(self, key)}")
        if not 1 <= self.ticks_per_second <= 1000:
            raise UserError(f"moonbeam tokenizer: ticks_per_second must be in 1..1000, "
                            f"got {self.ticks_per_second}")
        if self.long_gap not in _LONG_GAP:
            raise UserError(f"moonbeam tokenizer: long_gap must be one of {', '.join(_LONG_GAP)}, "
                            f"got '{self.long_gap}'")

    @classmethod
    def preset(cls, model: str, **overrides: Any) -> CompoundConfig:
        """`CompoundConfig.preset("309M")`: the vocabulary sizes of a released checkpoint."""
        if model not in PRESETS:
            raise UserError(f"unknown Moonbeam model '{model}'; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[model], **overrides})


@register
class CompoundTokenizer(Tokenizer):
    """Moonbeam compound tokens: `encode(score) -> (T, 6) int64`, `decode(rows) -> Score`.

    Attributes: `sizes` (6 attribute vocabulary sizes, Δonset first), `offsets` (their flat-id
    offsets), `sos_classes` / `eos_classes` (raw reserved values, size-2 / size-1),
    `max_shift` / `max_dur` (largest encodable Δonset / duration in ticks).
    """

    name: ClassVar[str] = "moonbeam"
    step_name: ClassVar[str] = "event"
    note_durations: ClassVar[bool] = True
    config_class: ClassVar[type] = CompoundConfig

    def __init__(self, config: CompoundConfig | None = None) -> None:
        self.config = config if config is not None else CompoundConfig()
        c = self.config
        self.sizes = np.array([c.onset_vocab_size, c.dur_vocab_size, OCTAVE_VOCAB,
                               PITCH_CLASS_VOCAB, INSTRUMENT_VOCAB, VELOCITY_VOCAB], np.int64)
        self.offsets = 1 + np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.sos_classes = self.sizes - 2
        self.eos_classes = self.sizes - 1
        self.max_shift = int(c.onset_vocab_size) - 3
        self.max_dur = int(c.dur_vocab_size) - 3
        self._vocab_size = int(1 + self.sizes.sum())

    # --- interface -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        """`bos`/`eos`/`pad` are row markers (the value in all six columns), `sos_out` a flat id."""
        return {"bos": SOS, "eos": EOS, "pad": PAD, "sos_out": SOS_OUT_ID}

    @property
    def event_shape(self) -> tuple[int, ...]:
        return (NUM_ATTRIBUTES,)

    def id_ranges(self) -> list[range]:
        """Flat-id range of each attribute (Δonset, dur, octave, pc, instrument, velocity)."""
        return [range(int(o), int(o + s)) for o, s in zip(self.offsets, self.sizes)]

    # --- encode --------------------------------------------------------------------------
    def encode(self, score: symusic.Score) -> np.ndarray:
        """Score -> (T, 6) int64 rows `[SOS] chunk [EOS] ...` (see the module docstring)."""
        return self.encode_with_stats(score)[0]

    def encode_note(self, tokens: np.ndarray) -> str | None:
        chunks = int((np.asarray(tokens).reshape(-1, NUM_ATTRIBUTES)[:, 0] == SOS).sum())
        if chunks <= 1:
            return None
        gap = self.max_shift / self.config.ticks_per_second
        return f"split at {chunks - 1} silence(s) longer than {gap:.2f} s into {chunks} samples"

    def encode_with_stats(self, score: symusic.Score) -> tuple[np.ndarray, dict[str, int]]:
        """Like `encode`, plus counts: `chunks`, `split_gaps`, `clamped_gaps`,
        `clamped_durations`, `dropped` (1 when `long_gap="drop"` dropped the file)."""
        events = self.score_events(score)
        stats = {"chunks": 0, "split_gaps": 0, "clamped_gaps": 0, "clamped_durations": 0,
                 "dropped": 0}
        long_dur = events[:, 1] > self.max_dur
        stats["clamped_durations"] = int(long_dur.sum())
        events[long_dur, 1] = self.max_dur
        onset = events[:, 0]
        shift = np.diff(onset, prepend=0)
        long = shift > self.max_shift
        if long.any() and self.config.long_gap == "drop":
            stats["dropped"] = 1
            return np.zeros((0, NUM_ATTRIBUTES), np.int64), stats
        if self.config.long_gap == "clamp":
            stats["clamped_gaps"] = int(long.sum())
            events[:, 0] = np.cumsum(np.minimum(shift, self.max_shift))
            chunks = [events]
        else:
            stats["split_gaps"] = int(long.sum())
            cuts = np.flatnonzero(long)
            chunks = [c for c in np.split(events, cuts) if len(c)] or [events]
            for i, c in enumerate(chunks):
                if i > 0 or (len(c) and c[0, 0] > self.max_shift):
                    c[:, 0] -= c[0, 0]
        stats["chunks"] = len(chunks)
        sos = np.full((1, NUM_ATTRIBUTES), SOS, np.int64)
        eos = np.full((1, NUM_ATTRIBUTES), EOS, np.int64)
        rows = np.concatenate([part for c in chunks for part in (sos, c, eos)])
        return rows, stats

    def score_events(self, score: symusic.Score) -> np.ndarray:
        """Score -> (n, 6) events, absolute onsets, no specials, no vocabulary limits applied."""
        score = score.to("second")
        tps = self.config.ticks_per_second
        parts = []
        for ti, track in enumerate(score.tracks):
            notes = track.notes.numpy()
            if len(notes["time"]) == 0:
                continue
            start = notes["time"].astype(np.float64)
            end = start + notes["duration"].astype(np.float64)
            if self.config.fold_pedal and not track.is_drum:
                end = _fold_track_pedal(track, start, end)
            pitch = notes["pitch"].astype(np.int64)
            instrument = DRUM_INSTRUMENT if track.is_drum else int(track.program)
            n = len(start)
            parts.append((start, end, pitch, notes["velocity"].astype(np.int64),
                          np.full(n, instrument, np.int64), np.full(n, ti), np.arange(n)))
        if not parts:
            return np.zeros((0, NUM_ATTRIBUTES), np.int64)
        start, end, pitch, vel, instr, track_idx, note_idx = (
            np.concatenate(x) for x in zip(*parts))
        order = np.lexsort((note_idx, track_idx, start))
        start, end, pitch, vel, instr = (x[order] for x in (start, end, pitch, vel, instr))
        onset = np.rint(start * tps).astype(np.int64)
        dur = np.maximum(np.rint((end - start) * tps).astype(np.int64), 1)
        return np.stack([onset, dur, pitch // 12, pitch % 12, instr, np.clip(vel, 1, 127)], 1)

    def augment(self, tokens: np.ndarray, transpose: int = 0, stretch: float = 1.0) -> np.ndarray:
        """Transpose by semitones and stretch time on (T, 6) rows (training crops).

        Events pushed out of the piano's 21..108 (drums are never transposed) are dropped;
        onsets and durations are multiplied by `stretch` and rounded, durations kept >= 1 and
        <= max_dur, and a Δonset that would exceed max_shift is shortened to it, so the result
        always has valid labels. SOS/EOS/PAD rows are kept as they are.
        """
        if transpose == 0 and stretch == 1.0:
            return tokens
        if not (np.isfinite(stretch) and stretch > 0):
            raise ValueError(f"stretch must be a positive finite number, got {stretch}")
        rows = np.array(tokens, dtype=np.int64).reshape(-1, NUM_ATTRIBUTES)
        event = rows[:, 0] >= 0
        drum = rows[:, 4] == DRUM_INSTRUMENT
        pitch = rows[:, 2] * 12 + rows[:, 3] + np.where(drum, 0, int(transpose))
        keep = ~event | drum | ((pitch >= 21) & (pitch <= 108))
        rows[event, 2], rows[event, 3] = pitch[event] // 12, pitch[event] % 12
        rows[event, 1] = np.clip(np.rint(rows[event, 1] * stretch), 1, self.max_dur)
        rows = rows[keep]
        event = rows[:, 0] >= 0
        onset = np.rint(rows[:, 0] * stretch).astype(np.int64)
        # Re-cap every Δonset within its sample (the base restarts at 0 after an SOS).
        sample = np.cumsum(rows[:, 0] == SOS)
        idx = np.flatnonzero(event)
        prev = np.zeros(len(idx), np.int64)
        same = np.zeros(len(idx), bool)
        same[1:] = sample[idx[1:]] == sample[idx[:-1]]
        prev[1:] = onset[idx[:-1]]
        delta = np.minimum(onset[idx] - np.where(same, prev, 0), self.max_shift)
        total = np.cumsum(delta)  # restarted at each sample's first event:
        before = (total - delta)[np.flatnonzero(~same)]
        rows[idx, 0] = total - before[np.cumsum(~same) - 1]
        return rows

    # --- labels --------------------------------------------------------------------------
    def to_labels(self, rows: np.ndarray) -> np.ndarray:
        """(T, 6) rows -> (T, 7) flat ids `[sos_out, Δonset, dur, oct, pc, instr, vel]`.

        SOS rows get the SOS classes, EOS rows the EOS classes, PAD rows all zeros (as the
        reference's packing pads labels). Raises ValueError on a value outside its attribute's
        data range (Δonset 0..max_shift, dur 1..max_dur, ...), e.g. a negative Δonset.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1, NUM_ATTRIBUTES)
        marker = rows[:, 0]
        is_sos, is_eos, is_pad = marker == SOS, marker == EOS, marker == PAD
        is_event = ~(is_sos | is_eos | is_pad)
        # Δonset from the previous event of the same sample; the base is 0 after each SOS.
        onset = rows[:, 0]
        sample = np.cumsum(is_sos)
        ev_idx = np.flatnonzero(is_event)
        prev_same = np.zeros(len(ev_idx), bool)
        prev_same[1:] = sample[ev_idx[1:]] == sample[ev_idx[:-1]]
        base = np.zeros(len(rows), np.int64)
        base[ev_idx[1:]] = np.where(prev_same[1:], onset[ev_idx[:-1]], 0)
        raw = rows.copy()
        raw[:, 0] = onset - base
        lo = np.array([0, 1, 0, 0, 0, 1])
        hi = np.concatenate([[self.max_shift, self.max_dur], self.sizes[2:] - 3])
        ev = raw[is_event]
        bad = (ev < lo) | (ev > hi)
        if bad.any():
            i, a = np.argwhere(bad)[0]
            raise ValueError(f"event {int(np.flatnonzero(is_event)[i])}: attribute {int(a)} value "
                             f"{int(ev[i, a])} outside {int(lo[a])}..{int(hi[a])}")
        raw[is_sos] = self.sos_classes
        raw[is_eos] = self.eos_classes
        labels = np.zeros((len(rows), NUM_ATTRIBUTES + 1), np.int64)
        labels[:, 1:] = raw + self.offsets
        labels[is_pad] = 0
        return labels

    def from_labels(self, labels: np.ndarray) -> np.ndarray:
        """Inverse of `to_labels`: (T, 7) or (T, 6) flat ids -> (T, 6) rows, absolute onsets.

        A label row with Δonset at its SOS class becomes `[-1]*6`, at its EOS class `[-2]*6`;
        all-zero rows become `[-3]*6`. Onsets accumulate Δonset, from 0 after each SOS.
        """
        labels = np.asarray(labels, dtype=np.int64)
        if labels.ndim == 2 and labels.shape[1] == NUM_ATTRIBUTES + 1:
            labels = labels[:, 1:]
        labels = labels.reshape(-1, NUM_ATTRIBUTES)
        raw = labels - self.offsets
        is_pad = (labels == 0).all(1)
        is_sos = ~is_pad & (raw[:, 0] == self.sos_classes[0])
        is_eos = ~is_pad & (raw[:, 0] == self.eos_classes[0])
        rows = raw.copy()
        # Onset = running sum of Δonset over events, restarted at each SOS.
        delta = np.where(is_sos | is_eos | is_pad, 0, raw[:, 0])
        total = np.cumsum(delta)
        at_sos = np.maximum.accumulate(np.where(is_sos, np.arange(len(rows)), -1))
        rows[:, 0] = total - np.where(at_sos >= 0, total[np.maximum(at_sos, 0)], 0)
        rows[is_sos] = SOS
        rows[is_eos] = EOS
        rows[is_pad] = PAD
        return rows

    # --- decode --------------------------------------------------------------------------
    def decode(self, tokens: np.ndarray) -> symusic.Score:
        """(T, 6) rows -> Score (ticks, 50 per quarter at 120 BPM: one tick = 10 ms).

        Never raises. One track per instrument in order of first appearance, program = the
        instrument (0 is piano), 128 a drum track. SOS (onset -1) starts a sample; an EOS row
        (onset -2, or any of dur..vel at its EOS class, as generation truncates) ends it and
        rows up to the next SOS are skipped; PAD and rows with an invalid value (octave > 10,
        pitch > 127, dur outside 1..max_dur, velocity outside 1..127, ...) are skipped. A
        later sample (after a split at a long gap) starts where the previous one's last note
        ends. Input of another shape is read as rows of six when it can be, else as empty.
        """
        rows = _clean_rows(tokens)
        score = symusic.Score(_DECODE_TPQ)
        score.tempos.append(symusic.Tempo(0, _DECODE_QPM))
        if len(rows) == 0:
            return score
        marker = rows[:, 0]
        is_sos = marker == SOS
        is_eos = (marker == EOS) | (rows[:, 1:] == self.eos_classes[1:]).any(1)
        # Sample index and "after EOS" flag per row.
        sample = np.cumsum(is_sos)
        eos_pos = np.where(is_eos, np.arange(len(rows)), -1)
        sos_pos = np.where(is_sos, np.arange(len(rows)), -1)
        last_eos = np.maximum.accumulate(eos_pos)
        last_sos = np.maximum.accumulate(sos_pos)
        live = last_eos < last_sos
        live |= (last_eos < 0)  # before any EOS: no SOS needed
        onset, dur, octv, pc, instr, vel = rows.T
        pitch = octv * 12 + pc
        valid = (live & ~is_sos & ~is_eos & (onset >= 0) & (onset < 2**30)
                 & (dur >= 1) & (dur <= self.max_dur) & (octv >= 0) & (octv <= 10)
                 & (pc >= 0) & (pc <= 11) & (pitch <= 127) & (instr >= 0)
                 & (instr <= DRUM_INSTRUMENT) & (vel >= 1) & (vel <= 127))
        idx = np.flatnonzero(valid)
        if len(idx) == 0:
            return score
        # Place each sample after the previous sample's end.
        s_of = sample[idx]
        ends = onset[idx] + dur[idx]
        uniq, inv = np.unique(s_of, return_inverse=True)
        sample_end = np.zeros(len(uniq), np.int64)
        np.maximum.at(sample_end, inv, ends)
        shift = np.concatenate([[0], np.cumsum(sample_end)[:-1]])
        start = onset[idx] + shift[inv]
        keep = start + dur[idx] < 2**31 - 1
        idx, start = idx[keep], start[keep]
        inst = instr[idx]
        _, first = np.unique(inst, return_index=True)
        for value in inst[np.sort(first)]:
            sel = inst == value
            order = np.argsort(start[sel], kind="stable")
            drum = int(value) == DRUM_INSTRUMENT
            track = symusic.Track(name="Drums" if drum else f"Program {int(value)}",
                                  program=0 if drum else int(value), is_drum=drum)
            track.notes = symusic.Note.from_numpy(
                time=start[sel][order].astype(np.int32),
                duration=dur[idx][sel][order].astype(np.int32),
                pitch=pitch[idx][sel][order].astype(np.int8),
                velocity=vel[idx][sel][order].astype(np.int8),
            )
            score.tracks.append(track)
        return score


# --- helpers ---------------------------------------------------------------------------------
def _clean_rows(tokens: Any) -> np.ndarray:
    """Anything -> (n, 6) int64 rows, or (0, 6) when it cannot be read as such."""
    try:
        a = np.asarray(tokens)
        if a.dtype.kind not in "iu":
            a = np.nan_to_num(a.astype(np.float64), nan=-9, posinf=-9, neginf=-9)
            a = np.where(np.abs(a) < 2**62, a, -9)
        a = a.astype(np.int64)
        if a.ndim == 0 or a.size % NUM_ATTRIBUTES:
            return np.zeros((0, NUM_ATTRIBUTES), np.int64)
        return a.reshape(-1, NUM_ATTRIBUTES)
    except (TypeError, ValueError, OverflowError):
        return np.zeros((0, NUM_ATTRIBUTES), np.int64)


def _fold_track_pedal(track: symusic.Track, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    controls = track.controls.numpy()
    pedal = controls["number"] == SUSTAIN_CC
    if not pedal.any():
        return end
    piece_end = float(max(np.max(end, initial=0.0), np.max(controls["time"][pedal])))
    down, up = pedal_spans(controls["time"][pedal], controls["value"][pedal], piece_end)
    return fold_pedal(end, down, up)
