"""Performance events with durations instead of note-offs: no note can be left open.

One id per event; every note is the triple VELOCITY, NOTE, DURATION at its onset:

    0 PAD, 1 BOS, 2 EOS | NOTE x88 | DURATION xD | TIME_SHIFT x100 | VELOCITY x32 | styles

TIME_SHIFTs (10 ms .. 1 s, longer gaps take several) move the clock between onsets, exactly
as in the Music Transformer's performance events (`mehldau.tokenize.performance`); notes of
one instant go lowest pitch first. DURATION values lie on a grid that is fine where most
notes are and coarser where few are: by default 10 ms steps up to 1 s, 20 ms to 2 s, 50 ms to
4 s and 100 ms to 8 s (230 values, `duration_grid`); a duration is rounded to the nearest
grid value, and longer notes are shortened to the longest (counted by `encode_note`).

Why durations (issue: notes hanging for seconds in every sample). With note-on/note-off
events a model has to remember which keys are down and close each one later; a small model
does that badly even inside one window, and a note whose note-on has left the context window
cannot be closed on purpose at all: it rings until a safety cut. A duration decided at the
onset cannot be forgotten, crops and sampling windows can start anywhere without hidden
state, and the sequence is no longer (one DURATION replaces one NOTE_OFF). Peers that model
piano performances chose the same: Aria (onset, pitch, velocity, duration), the Anticipatory
Music Transformer (time, duration, note), Moonbeam (compound rows with a duration) and MidiTok's
TSD. Velocity comes with every note rather than only on change (Magenta's rule): 87 % of the
notes of a real jazz-piano corpus change the bin anyway, and this way no crop starts without
knowing its loudness.

Measured (tiny preset, its default 600 steps on 64 real jazz-piano performances, 30 s
continuations of 5 s prompts from the held-out pieces, pedal-folded notes on both sides):
mean polyphony 2.1-2.6 times the human's with note-on/off tokens (8 s safety cut closing
3-5 % of the notes); 2.4 times with note-on/off tokens plus a state prefix (the held notes
and the current velocity stated at every crop and window start, the other candidate: the
small model fails to close notes inside a window too, and 8 % reached the cut); 0.8 times
with these tokens, notes per second 1.1 times, none cut.

The grammar is fixed, so `next_token_mask` gives the sampler what may follow each id
(VELOCITY -> NOTE -> DURATION); sampled sequences never break a note apart. `decode` still
never raises: a NOTE without a DURATION right after it is dropped, a DURATION or VELOCITY out
of place is ignored, a note of a pitch that is still sounding ends the earlier one.

Why hand-written and not miditok's TSD, which has the same event kinds (checked against
miditok 3.1, `miditok/tokenizations/tsd.py`): TSD counts time in beats of the file's tempo
map, and clips a pause longer than its largest TimeShift to that value (its docstring says so),
where a performance needs absolute 10 ms steps that chain across long pauses; its durations
share the time-shift grid (`beat_res`), which cannot be 10 ms fine near zero and coarse near
8 s; and its augmentation works on files, while our crops are augmented as token arrays
(`augment`). symusic still does all MIDI reading and writing, and the note extraction (piano
tracks, sustain pedal folded into note ends) is `PerformanceTokenizer.score_notes`, so both
event vocabularies see the same notes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import symusic

from mehldau.errors import UserError
from mehldau.tokenize.base import register
from mehldau.tokenize.notes import piano_score
from mehldau.tokenize.performance import (
    EOS_ID,
    NUM_SPECIAL,
    PAD_ID,
    IdTokenizer,
    PerformanceConfig,
    PerformanceTokenizer,
    clean_ids,
    write_time_shifts,
)


@dataclass
class DurationConfig:
    min_pitch: int = 21  # lowest piano key (A0)
    max_pitch: int = 108  # highest piano key (C8)
    steps_per_second: int = 100  # time grid: 10 ms
    max_shift_steps: int = 100  # longest single TIME_SHIFT: 1 s
    num_velocity_bins: int = 32
    # Duration values: [up_to, step] pairs in time steps, e.g. [100, 1] = every step up to
    # 1 s, then [200, 2] = every second step up to 2 s, ...; the last up_to is the longest note.
    duration_grid: list[list[int]] = field(
        default_factory=lambda: [[100, 1], [200, 2], [400, 5], [800, 10]])
    shared_pedal: bool = True  # as PerformanceConfig
    piano_only: bool = True  # as PerformanceConfig
    styles: list[str] = field(default_factory=list)  # as PerformanceConfig

    def __post_init__(self) -> None:
        try:
            grid = [(int(u), int(s)) for u, s in self.duration_grid]
        except (TypeError, ValueError) as e:
            raise UserError(f"duration tokenizer: duration_grid must be [up_to, step] pairs, "
                            f"got {self.duration_grid}") from e
        lo = 0
        for up_to, step in grid:
            if step < 1 or up_to <= lo or (up_to - lo) % step:
                raise UserError(f"duration tokenizer: bad duration_grid entry [{up_to}, {step}]: "
                                "up_to must grow and each range must be a multiple of its step")
            lo = up_to
        if not grid:
            raise UserError("duration tokenizer: duration_grid is empty")
        self.duration_grid = [list(g) for g in grid]
        # The shared fields are checked by the performance config.
        PerformanceConfig(min_pitch=self.min_pitch, max_pitch=self.max_pitch,
                          steps_per_second=self.steps_per_second,
                          max_shift_steps=self.max_shift_steps,
                          num_velocity_bins=self.num_velocity_bins)


@register
class DurationTokenizer(IdTokenizer):
    """Notes as (VELOCITY, NOTE, DURATION) at their onsets: `encode(score) -> (T,) int64`.

    Id ranges: `note_range`, `duration_range` (grid value `durations[i]` -> offset + i),
    `time_shift_range` (k steps -> offset + k - 1), `velocity_range` (bin b -> offset + b).
    """

    name: ClassVar[str] = "duration"
    note_durations: ClassVar[bool] = True
    config_class: ClassVar[type] = DurationConfig

    def __init__(self, config: DurationConfig | None = None) -> None:
        self.config = config if config is not None else DurationConfig()
        c = self.config
        # Note extraction, velocity bins and the decoded MIDI's grid are the performance
        # tokenizer's, with the same settings.
        self._perf = PerformanceTokenizer(PerformanceConfig(
            min_pitch=c.min_pitch, max_pitch=c.max_pitch, steps_per_second=c.steps_per_second,
            max_shift_steps=c.max_shift_steps, num_velocity_bins=c.num_velocity_bins,
            shared_pedal=c.shared_pedal, piano_only=c.piano_only))
        grid, lo = [], 0
        for up_to, step in c.duration_grid:
            grid.append(np.arange(lo + step, up_to + 1, step))
            lo = up_to
        self.durations = np.concatenate(grid).astype(np.int64)  # (D,) steps, increasing
        self.num_pitches = c.max_pitch - c.min_pitch + 1
        self._lay_out(note=self.num_pitches, duration=len(self.durations),
                      time_shift=c.max_shift_steps, velocity=c.num_velocity_bins,
                      style=len(c.styles))

    # --- interface -----------------------------------------------------------------------
    @property
    def max_duration_seconds(self) -> float:
        return float(self.durations[-1]) / self.config.steps_per_second

    def seconds_per_id(self) -> np.ndarray:
        secs = np.zeros(self.vocab_size, dtype=np.float32)
        steps = np.arange(1, self.config.max_shift_steps + 1)
        secs[self.time_shift_range.start:self.time_shift_range.stop] = \
            steps / self.config.steps_per_second
        return secs

    def next_token_mask(self) -> np.ndarray:
        """(V, V) bool: row a = the ids allowed right after id a. VELOCITY -> NOTE ->
        DURATION; a NOTE only after a VELOCITY, a DURATION only after a NOTE. Rows of PAD,
        EOS and style ids allow everything (a training crop may start anywhere after them)."""
        V = self.vocab_size
        note, dur = self.note_range, self.duration_range
        mask = np.ones((V, V), bool)
        mask[:, note.start:note.stop] = False
        mask[:, dur.start:dur.stop] = False
        vel = self.velocity_range
        mask[vel.start:vel.stop] = False
        mask[vel.start:vel.stop, note.start:note.stop] = True
        mask[note.start:note.stop] = False
        mask[note.start:note.stop, dur.start:dur.stop] = True
        free = [PAD_ID, EOS_ID, *range(self.style_offset, V)]
        mask[free] = True
        return mask

    def duration_index(self, steps: np.ndarray | int) -> np.ndarray:
        """Durations in steps -> index of the nearest grid value (ties to the shorter one);
        longer than the grid -> its last value."""
        d = np.asarray(steps, np.int64)
        g = self.durations
        i = np.clip(np.searchsorted(g, d), 1, len(g) - 1)
        lower_is_nearer = (d - g[i - 1]) <= (g[i] - d)
        return np.where(d <= g[0], 0, np.where(lower_is_nearer, i - 1, i))

    # --- encode --------------------------------------------------------------------------
    def encode(self, score: symusic.Score) -> np.ndarray:
        """Score (any time unit) -> (T,) int64 ids; all non-drum tracks merged, pedal folded.

        Times are rounded to the step grid, notes outside min_pitch..max_pitch dropped, of two
        overlapping notes of one pitch the earlier ends where the later begins (as the
        performance tokenizer), then each duration is rounded to the grid."""
        start, end, pitch, vbin = self._perf.grid_notes(score)
        return self._notes_to_ids(start, pitch, self.duration_index(end - start), vbin)

    def encode_note(self, tokens: np.ndarray) -> str | None:
        """How many notes were longer than the longest duration (shortened by `encode`)."""
        ev = self._parse(self._clean_ids(tokens))
        n = int((ev["dur_index"] == len(self.durations) - 1).sum())
        if n == 0:
            return None
        return f"{n} note(s) of {self.max_duration_seconds:g} s or longer shortened to it"

    def _notes_to_ids(self, start: np.ndarray, pitch: np.ndarray, dur_index: np.ndarray,
                      vbin: np.ndarray, end_time: int | None = None) -> np.ndarray:
        """Notes (any order) -> ids: shifts to each onset, then VELOCITY NOTE DURATION.
        `end_time` adds trailing shifts after the last onset (a crop's tail of silence)."""
        order = np.lexsort((pitch, start))
        start, pitch, dur_index, vbin = start[order], pitch[order], dur_index[order], vbin[order]
        max_shift = self.config.max_shift_steps
        n = len(start)
        gap = np.diff(start, prepend=0)  # (n,) steps since the previous onset
        if end_time is not None:
            gap = np.append(gap, max(0, end_time - (int(start[-1]) if n else 0)))
        num_shifts = -(-gap // max_shift)  # ceil
        length = num_shifts.copy()
        length[:n] += 3
        first = np.cumsum(length) - length  # position of each note's (or the tail's) first id
        out = np.empty(int(length.sum()), np.int64)
        write_time_shifts(out, first, gap, num_shifts, self.time_shift_offset, max_shift)
        at = first[:n] + num_shifts[:n]
        out[at] = self.velocity_offset + vbin
        out[at + 1] = self.note_offset + pitch - self.config.min_pitch
        out[at + 2] = self.duration_offset + dur_index
        return out

    # --- decode --------------------------------------------------------------------------
    def _clean_ids(self, tokens: np.ndarray) -> np.ndarray:
        return clean_ids(tokens, NUM_SPECIAL, self.style_offset)

    def _parse(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Clean ids -> complete notes (a NOTE with a DURATION right after it): onset step,
        pitch, grid index, velocity bin (the last VELOCITY before it, -1 if none); and the
        total time the shifts cover."""
        is_shift = (ids >= self.time_shift_offset) & (ids < self.velocity_offset)
        is_vel = ids >= self.velocity_offset
        is_note = (ids >= self.note_offset) & (ids < self.duration_offset)
        is_dur = (ids >= self.duration_offset) & (ids < self.time_shift_offset)
        time = np.cumsum(np.where(is_shift, ids - self.time_shift_offset + 1, 0))
        last_vel = (np.maximum.accumulate(np.where(is_vel, np.arange(len(ids)), -1))
                    if len(ids) else np.zeros(0, np.int64))
        vbin = np.where(last_vel >= 0, ids[np.maximum(last_vel, 0)] - self.velocity_offset, -1)
        pos = np.flatnonzero(is_note[:-1] & is_dur[1:])
        return {"time": time[pos], "pitch": ids[pos] - self.note_offset + self.config.min_pitch,
                "dur_index": ids[pos + 1] - self.duration_offset, "vbin": vbin[pos],
                "total": int(time[-1]) if len(ids) else 0}

    def decode(self, tokens: np.ndarray) -> symusic.Score:
        """Ids -> one-track piano Score (ticks, 120 BPM). Never raises: specials, invalid ids
        and incomplete notes are skipped; a note of a pitch still sounding ends the earlier
        one there (two at one instant: the later in the sequence is kept); a note with no
        VELOCITY before it gets velocity 64."""
        ev = self._parse(self._clean_ids(tokens))
        start, pitch, vbin = ev["time"], ev["pitch"], ev["vbin"]
        end = start + self.durations[ev["dur_index"]]
        order = np.lexsort((np.arange(len(start)), start, pitch))  # per pitch, in time
        start, end, pitch, vbin = start[order], end[order], pitch[order], vbin[order]
        same = np.zeros(len(pitch), bool)
        same[:-1] = pitch[1:] == pitch[:-1]
        end = np.where(same, np.minimum(end, np.append(start[1:], 0)), end)
        keep = end > start
        start, end, pitch, vbin = start[keep], end[keep], pitch[keep], vbin[keep]
        velocity = np.where(vbin >= 0, self._perf.bin_to_velocity(np.maximum(vbin, 0)), 64)
        return piano_score(start, end, pitch, velocity, self._perf.ticks_per_step,
                           self._perf.decode_tpq)

    # --- augmentation --------------------------------------------------------------------
    def _rebuild(self, ev: dict[str, np.ndarray], pitch: np.ndarray, keep: np.ndarray,
                 stretch: float) -> np.ndarray:
        """`augment`: onsets, durations and the crop's total time are multiplied by `stretch`
        and rounded (durations back to the grid); the pieces of a note cut by either end of a
        crop are dropped."""
        keep = keep & (ev["vbin"] >= 0)  # a crop that starts at a NOTE has lost its VELOCITY
        start = np.floor(ev["time"][keep] * stretch + 0.5).astype(np.int64)
        dur = np.floor(self.durations[ev["dur_index"][keep]] * stretch + 0.5).astype(np.int64)
        end_time = max(int(np.floor(ev["total"] * stretch + 0.5)), int(start.max(initial=0)))
        return self._notes_to_ids(start, pitch[keep], self.duration_index(np.maximum(dur, 1)),
                                  ev["vbin"][keep], end_time=end_time)
