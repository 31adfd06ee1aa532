"""Note-level statistics of a set of performances: how dense, how sustained, how polyphonic.

These are what a listener hears first and what a small model gets wrong first: notes left
hanging (a held-pedal smear), or held notes broken into trains of re-strikes. For a set of
MIDI files (generated, or the human reference) over a time span of each:

- `notes_per_second`: onsets in the span / the span's length (pooled over the set);
- `polyphony`: mean number of notes sounding, over the 10 ms frames of the span where at least
  one sounds (MusPy's `polyphony`, on a seconds grid rather than the MIDI tick grid, so tempo
  maps do not matter);
- `median_duration` and `share_over_2s`: the note-length distribution of the notes whose onset
  falls in the span (durations are not clipped at its end).

Notes are read as every tokenizer of this project reads them: the piano-family tracks when
the file has any, the sustain pedal folded into note ends (`mehldau.tokenize.notes`), so
the reference is measured on the same notes the models learn from. Pooling over the set
(rather than averaging per file) weights every second of music equally.

Hand-written because the libraries that compute such figures do not fit: MusPy's metrics work
on its own `Music` objects on a tick grid and ignore the pedal; mgeval needs Python 2.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import symusic

from mehldau.tokenize.notes import score_notes

FRAMES_PER_SECOND = 100
LONG_NOTE_SECONDS = 2.0


@dataclass
class NoteStats:
    files: int
    seconds: float  # total span measured
    notes: int  # onsets in the span
    notes_per_second: float
    polyphony: float  # mean notes sounding where any sounds
    median_duration: float  # seconds
    share_over_2s: float  # fraction of notes longer than 2 s

    def to_dict(self) -> dict:
        return asdict(self)


def read_notes(source: str | Path | symusic.Score, fold_pedal: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
    """A MIDI file or Score -> (onsets, ends) in seconds, piano tracks only; with `fold_pedal`
    a note ends when the sustain pedal lets it go, else when its key is released."""
    score = source if isinstance(source, symusic.Score) else symusic.Score(str(source))
    if not fold_pedal:
        score = score.copy()
        for track in score.tracks:
            track.controls.clear()
    start, end, _, _ = score_notes(score)
    return np.asarray(start, np.float64), np.asarray(end, np.float64)


def note_stats(sources: Iterable[str | Path | symusic.Score], start: float = 0.0,
               seconds: float | None = None, fold_pedal: bool = True) -> NoteStats:
    """Pooled statistics of the span `start .. start + seconds` of every source (to each
    piece's end when `seconds` is None; a piece shorter than the span counts its own length).
    `fold_pedal=False` measures key-down durations (pedal ignored) instead."""
    n_files, total, onsets, durations, per_frame = 0, 0.0, 0, [], []
    for source in sources:
        s, e = read_notes(source, fold_pedal)
        stop = float(e.max(initial=start)) if seconds is None else start + seconds
        if seconds is not None:
            stop = min(stop, max(float(e.max(initial=start)), start))
        span = max(stop - start, 0.0)
        n_files += 1
        total += span
        inside = (s >= start) & (s < stop)
        onsets += int(inside.sum())
        durations.append(e[inside] - s[inside])
        per_frame.append(sounding(s, e, start, stop))
    d = np.concatenate(durations) if durations else np.zeros(0)
    frames = np.concatenate(per_frame) if per_frame else np.zeros(0, np.int64)
    busy = frames[frames > 0]
    return NoteStats(
        files=n_files, seconds=round(total, 3), notes=onsets,
        notes_per_second=onsets / total if total > 0 else 0.0,
        polyphony=float(busy.mean()) if len(busy) else 0.0,
        median_duration=float(np.median(d)) if len(d) else 0.0,
        share_over_2s=float((d > LONG_NOTE_SECONDS).mean()) if len(d) else 0.0)


def sounding(start: np.ndarray, end: np.ndarray, t0: float, t1: float) -> np.ndarray:
    """Notes sounding in each 10 ms frame of t0 .. t1: a difference array over frames."""
    n = int(np.ceil((t1 - t0) * FRAMES_PER_SECOND - 1e-9))
    if n <= 0:
        return np.zeros(0, np.int64)
    a = np.clip(np.floor((start - t0) * FRAMES_PER_SECOND + 0.5), 0, n).astype(np.int64)
    b = np.clip(np.floor((end - t0) * FRAMES_PER_SECOND + 0.5), 0, n).astype(np.int64)
    b = np.maximum(b, np.minimum(a + 1, n))  # a note inside the span sounds one frame at least
    diff = np.zeros(n + 1, np.int64)
    np.add.at(diff, a, 1)
    np.add.at(diff, b, -1)
    return np.cumsum(diff[:-1])


def midi_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files and folders (searched recursively) -> the MIDI files among them, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in (".mid", ".midi"))
        elif p.is_file():
            out.append(p)
    return out


def comparison_table(generated: NoteStats, reference: NoteStats) -> str:
    """A plain-text table: each figure for both sets and generated / reference."""
    rows = [("notes per second", "notes_per_second", "{:.2f}"),
            ("mean polyphony", "polyphony", "{:.2f}"),
            ("median note length (s)", "median_duration", "{:.3f}"),
            ("notes longer than 2 s", "share_over_2s", "{:.1%}")]
    lines = [f"{'':24}{'generated':>12}{'reference':>12}{'ratio':>8}",
             f"{'files / seconds':24}{generated.files:>5} / {generated.seconds:<5.0f}"
             f"{reference.files:>5} / {reference.seconds:<5.0f}"]
    for label, key, fmt in rows:
        g, r = getattr(generated, key), getattr(reference, key)
        ratio = f"{g / r:.2f}" if r else "-"
        lines.append(f"{label:24}{fmt.format(g):>12}{fmt.format(r):>12}{ratio:>8}")
    return "\n".join(lines)
