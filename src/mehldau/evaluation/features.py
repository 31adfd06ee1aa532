"""Per-piece note features of a performance, for comparing generated piano with the reference.

Every feature is a function `Notes -> 1-D float array` in `FEATURES` (a scalar as shape (1,)),
so `distribution.compare_feature` can treat them alike. They are measured on a seconds grid,
not on beats: the reference is transcribed audio with no reliable beat grid, and what the
models produce has none either. Notes are read as every tokenizer here reads them (piano
tracks, sustain pedal folded into note ends), so the reference is measured on the notes the
models learn from.

Hand-written rather than taken from mgeval (Python 2, beat-grid features via pretty_midi) or
MusPy (tick grid, its own `Music` objects, pedal ignored); `muspy_metrics` still reports the
MusPy figures themselves, on a fixed tick grid, for comparison with published numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import muspy
import numpy as np
import symusic

from mehldau.metrics import sounding  # 10 ms frames, the rule of the note statistics
from mehldau.tokenize.notes import score_notes

# Note-length bins: 13 log-spaced edges 0.02 s .. 8 s (ratio ~1.65 per bin); lengths outside
# are counted in the end bins, so a smeared 20 s note still registers as "very long".
LENGTH_EDGES = np.geomspace(0.02, 8.0, 13)
MUSPY_RESOLUTION = 50  # ticks per beat; at MUSPY_QPM = 120 that is 100 ticks per second
MUSPY_QPM = 120.0


@dataclass
class Notes:
    """Notes of one span, times in seconds from its start, sorted by (onset, pitch)."""

    onset: np.ndarray
    end: np.ndarray
    pitch: np.ndarray
    velocity: np.ndarray
    seconds: float  # length of the span the notes were cut from

    @classmethod
    def from_arrays(cls, onset, end, pitch, velocity=None, seconds: float | None = None
                    ) -> Notes:
        """Arrays in any order -> sorted Notes; velocity defaults to 64, `seconds` to the last
        note end."""
        onset, end = np.asarray(onset, np.float64), np.asarray(end, np.float64)
        pitch = np.asarray(pitch, np.int64)
        velocity = (np.full(len(onset), 64, np.int64) if velocity is None
                    else np.asarray(velocity, np.int64))
        order = np.lexsort((pitch, onset))
        if seconds is None:
            seconds = float(end.max(initial=0.0))
        return cls(onset[order], end[order], pitch[order], velocity[order], float(seconds))

    def __len__(self) -> int:
        return len(self.onset)


def cut(notes: Notes, start: float = 0.0, seconds: float | None = None) -> Notes:
    """The notes with onset in [start, start + seconds), shifted to start at 0. Ends are not
    clipped. The span stops at the end of `notes` at the latest, so a piece shorter than the
    span asked for is not charged for silence it never had."""
    stop = notes.seconds if seconds is None else min(start + seconds, notes.seconds)
    keep = (notes.onset >= start) & (notes.onset < stop)
    return Notes(notes.onset[keep] - start, notes.end[keep] - start, notes.pitch[keep],
                 notes.velocity[keep], max(stop - start, 0.0))


def read_notes(source: str | Path | symusic.Score, start: float = 0.0,
               seconds: float | None = None, fold_pedal: bool = True) -> Notes:
    """A MIDI file or Score -> the Notes of its span [start, start + seconds) (to the last note
    end when `seconds` is None). Without `fold_pedal` notes end at key release."""
    score = source if isinstance(source, symusic.Score) else symusic.Score(str(source))
    if not fold_pedal:
        score = score.copy()
        for track in score.tracks:
            track.controls.clear()
    return cut(Notes.from_arrays(*score_notes(score)), start, seconds)


def _scalar(x: float) -> np.ndarray:
    return np.array([float(x)])


def _normalised(h: np.ndarray) -> np.ndarray:
    total = h.sum()
    return h / total if total > 0 else h


def pitch_count(n: Notes) -> np.ndarray:
    return _scalar(len(np.unique(n.pitch)))


def pitch_class_histogram(n: Notes) -> np.ndarray:
    weight = np.clip(n.end - n.onset, 0.0, None)
    return _normalised(np.bincount(n.pitch % 12, weight, minlength=12).astype(np.float64))


def pitch_class_transition(n: Notes) -> np.ndarray:
    pc = n.pitch % 12
    m = np.zeros((12, 12))
    np.add.at(m, (pc[:-1], pc[1:]), 1.0)
    return _normalised(m).ravel()


def pitch_range(n: Notes) -> np.ndarray:
    return _scalar(n.pitch.max() - n.pitch.min() if len(n) else 0)


def mean_interval(n: Notes) -> np.ndarray:
    return _scalar(np.abs(np.diff(n.pitch)).mean() if len(n) > 1 else 0.0)


def notes_per_second(n: Notes) -> np.ndarray:
    return _scalar(len(n) / n.seconds if n.seconds > 0 else 0.0)


def mean_ioi(n: Notes) -> np.ndarray:
    onsets = np.unique(n.onset)  # a chord is one onset, not a train of zero gaps
    return _scalar(np.diff(onsets).mean() if len(onsets) > 1 else 0.0)


def note_length_histogram(n: Notes) -> np.ndarray:
    length = np.clip(n.end - n.onset, LENGTH_EDGES[0], LENGTH_EDGES[-1])
    return _normalised(np.histogram(length, LENGTH_EDGES)[0].astype(np.float64))


def velocity_mean(n: Notes) -> np.ndarray:
    return _scalar(n.velocity.mean() if len(n) else 0.0)


def velocity_std(n: Notes) -> np.ndarray:
    return _scalar(n.velocity.std() if len(n) else 0.0)


def polyphony(n: Notes) -> np.ndarray:
    frames = sounding(n.onset, n.end, 0.0, n.seconds)
    busy = frames[frames > 0]
    return _scalar(busy.mean() if len(busy) else 0.0)


FEATURES: dict[str, Callable[[Notes], np.ndarray]] = {
    f.__name__: f for f in (
        pitch_count, pitch_class_histogram, pitch_class_transition, pitch_range, mean_interval,
        notes_per_second, mean_ioi, note_length_histogram, velocity_mean, velocity_std,
        polyphony)
}


def to_muspy(n: Notes) -> muspy.Music:
    """Notes -> a one-track piano `muspy.Music` at 120 qpm, 50 ticks per beat: 10 ms ticks."""
    tick = MUSPY_RESOLUTION * MUSPY_QPM / 60.0
    t = np.round(n.onset * tick).astype(np.int64)
    d = np.maximum(np.round(n.end * tick).astype(np.int64) - t, 1)
    notes = [muspy.Note(time=int(a), pitch=int(p), duration=int(b), velocity=int(v))
             for a, p, b, v in zip(t, n.pitch, d, n.velocity)]
    return muspy.Music(resolution=MUSPY_RESOLUTION, tempos=[muspy.Tempo(0, MUSPY_QPM)],
                       tracks=[muspy.Track(program=0, name="piano", notes=notes)])


def muspy_metrics(n: Notes) -> dict[str, float]:
    """MusPy's own metrics on the Notes (NaN where MusPy gives NaN, e.g. no notes).

    MusPy's `polyphony_rate` counts steps with more than 2 pitches on (its default threshold),
    and its pianoroll counts a pitch once however many notes of it overlap. The `beat_grid_`
    figures assume the fixed 120 qpm, 4/4 grid `to_muspy` invents: a transcribed performance
    has no reliable beat grid, so they say nothing about rhythm and are only for comparison
    with papers that report them on such data."""
    m = to_muspy(n)
    out = {"pitch_class_entropy": muspy.pitch_class_entropy(m),
           "scale_consistency": muspy.scale_consistency(m),
           "polyphony": muspy.polyphony(m),
           "polyphony_rate": muspy.polyphony_rate(m),
           "pitch_range": muspy.pitch_range(m)}
    if len(n):
        out["beat_grid_empty_beat_rate"] = muspy.empty_beat_rate(m)
        out["beat_grid_groove_consistency"] = muspy.groove_consistency(m, 4 * MUSPY_RESOLUTION)
    else:
        out["beat_grid_empty_beat_rate"] = out["beat_grid_groove_consistency"] = math.nan
    return {k: float(v) for k, v in out.items()}


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum() if counts.sum() > 0 else np.zeros(0)
    return float(-(p * np.log2(p)).sum())


def sliding(n: Notes, window: float = 15.0, hop: float = 1.0) -> dict[str, float]:
    """Means over windows [t, t + window), t = 0, hop, ... while the window fits the span, of
    the pitch-class entropy (log2, note counts) and notes per second. Local figures: over a
    whole piece every pitch class turns up, so the whole-piece entropy hides a model that
    wanders off key or stalls on a few pitches. A span shorter than the window is one window
    (the whole span)."""
    if n.seconds <= window:
        starts, width = np.zeros(1), n.seconds
    else:
        starts, width = np.arange(0.0, n.seconds - window + 1e-9, hop), window
    lo = np.searchsorted(n.onset, starts, "left")
    hi = np.searchsorted(n.onset, starts + width, "left")
    pc = n.pitch % 12
    entropy = [_entropy(np.bincount(pc[a:b], minlength=12)) for a, b in zip(lo, hi)]
    rate = (hi - lo) / width if width > 0 else np.zeros(len(starts))
    return {"pitch_class_entropy": float(np.mean(entropy)),
            "notes_per_second": float(np.mean(rate))}


def random_notes(n_notes: int, seconds: float, rng: np.random.Generator) -> Notes:
    """The random-notes floor: uniform onsets over the span, uniform pitch 21..108 (the piano),
    log-uniform lengths 0.05..2 s, uniform velocity 20..110. Any metric that cannot tell a
    model from this is not measuring music."""
    onset = rng.uniform(0.0, seconds, n_notes)
    length = np.exp(rng.uniform(np.log(0.05), np.log(2.0), n_notes))
    return Notes.from_arrays(onset, onset + length, rng.integers(21, 109, n_notes),
                             rng.integers(20, 111, n_notes), seconds)
