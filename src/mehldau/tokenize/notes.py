"""Notes as every tokenizer and metric here reads them, and the score every decoder writes.

Reading: all non-drum tracks (the piano family only, when the file has one), the sustain
pedal (CC64) folded into note ends, as a listener hears them: a note lasts until its key is
released or, if the pedal is down then, until the pedal is lifted. Writing: one piano track at
120 BPM on a step grid. Hand-written because symusic and miditok give the raw key-down notes
and controller events but do not fold the pedal into durations.
"""

from __future__ import annotations

import numpy as np
import symusic

SUSTAIN_CC = 64
PIANO_PROGRAMS = range(0, 8)  # General MIDI piano family
DECODE_QPM = 120.0


def score_notes(score: symusic.Score, piano_only: bool = True, shared_pedal: bool = True
            ) -> tuple[np.ndarray, ...]:
    """Notes of all non-drum tracks in seconds, sustain pedal folded into their ends:
    (start, end, pitch, velocity), unsorted.

    `piano_only`: when the file has piano-family tracks (GM programs 0-7) with notes, only
    those. `shared_pedal`: a pedal on a track without notes (some exports put CC64 on its own
    track) holds the piano tracks that have no pedal of their own."""
    score = score.to("second")
    tracks = []
    for track in score.tracks:
        if track.is_drum:
            continue
        notes, controls = track.notes.numpy(), track.controls.numpy()
        pedal = controls["number"] == SUSTAIN_CC
        tracks.append((track.program, notes, controls["time"][pedal], controls["value"][pedal]))
    if not tracks:
        return tuple(np.zeros(0) for _ in range(4))
    # An unreleased pedal lasts until the last note or controller event of the piece.
    piece_end = max(
        [float(np.max(n["time"] + n["duration"], initial=0.0)) for _, n, _, _ in tracks]
        + [float(np.max(t, initial=0.0)) for _, _, t, _ in tracks])
    spans = [pedal_spans(t, v, piece_end) for _, _, t, v in tracks]
    shared = None
    if shared_pedal:
        pedal_only = [i for i, (_, n, _, _) in enumerate(tracks)
                      if len(n["time"]) < len(spans[i][0])]
        if pedal_only:
            shared = union_spans([spans[i] for i in pedal_only])
    keep_piano = piano_only and any(
        program in PIANO_PROGRAMS and len(n["time"]) for program, n, _, _ in tracks)
    starts, ends, pitches, velocities = [], [], [], []
    for (program, notes, _, _), (down, up) in zip(tracks, spans):
        if keep_piano and program not in PIANO_PROGRAMS:
            continue
        if shared is not None and len(down) == 0 and program in PIANO_PROGRAMS:
            down, up = shared
        s = notes["time"].astype(np.float64)
        e = s + notes["duration"].astype(np.float64)
        starts.append(s)
        ends.append(fold_pedal(e, down, up))
        pitches.append(notes["pitch"].astype(np.int64))
        velocities.append(notes["velocity"].astype(np.int64))
    return (np.concatenate(starts), np.concatenate(ends), np.concatenate(pitches),
            np.concatenate(velocities))


def piano_score(start: np.ndarray, end: np.ndarray, pitch: np.ndarray, velocity: np.ndarray,
                ticks_per_step: int, tpq: int) -> symusic.Score:
    """Notes on a step grid -> a one-track piano Score at 120 BPM (what every decoder writes)."""
    order = np.lexsort((pitch, start))
    score = symusic.Score(tpq)
    score.tempos.append(symusic.Tempo(0, DECODE_QPM))
    track = symusic.Track(name="Piano", program=0, is_drum=False)
    track.notes = symusic.Note.from_numpy(
        time=(start[order] * ticks_per_step).astype(np.int32),
        duration=((end - start)[order] * ticks_per_step).astype(np.int32),
        pitch=pitch[order].astype(np.int8),
        velocity=velocity[order].astype(np.int8),
    )
    score.tracks.append(track)
    return score


def pedal_spans(times: np.ndarray, values: np.ndarray, piece_end: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """CC64 events -> (press times, release times); value >= 64 is down."""
    order = np.argsort(times, kind="stable")
    t = times[order].astype(np.float64)
    down = values[order] >= 64
    was_down = np.concatenate([[False], down[:-1]])
    press, release = t[down & ~was_down], t[~down & was_down]
    if len(release) < len(press):  # still down at the end
        release = np.append(release, max(piece_end, press[-1]))
    return press, release


def union_spans(spans: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if len(spans) == 1:
        return spans[0]
    down = np.concatenate([d for d, _ in spans])
    up = np.concatenate([u for _, u in spans])
    order = np.argsort(down, kind="stable")
    down, up = down[order], np.maximum.accumulate(up[order])
    new = np.ones(len(down), bool)
    new[1:] = down[1:] > up[:-1]  # a press after every earlier span ended starts a new span
    group = np.cumsum(new) - 1
    ends = np.zeros(int(new.sum()))
    np.maximum.at(ends, group, up)
    return down[new], ends


def fold_pedal(end: np.ndarray, down: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Move each note end that falls while the pedal is down to the pedal release."""
    if len(down) == 0 or len(end) == 0:
        return end
    i = np.searchsorted(down, end, side="right") - 1
    j = np.maximum(i, 0)
    held = (i >= 0) & (end < up[j])
    return np.where(held, up[j], end)


def cut_prompt(score: symusic.Score, seconds: float) -> symusic.Score:
    """The first `seconds` of a performance as a prompt, in seconds: every note that starts
    before the cut, whole (as the key was held), and every controller and pitch bend before
    it; a sustain pedal still down at the cut is lifted there.

    The one place a prompt is cut, so `mehldau-generate prompt=...` and the prompts
    `mehldau-compare` writes read an excerpt alike, and cutting a cut prompt again changes
    nothing. Without the lift, a pedal pressed before the cut and released after it would
    never be released (its release is past the cut) and would hold its notes to the end of
    the excerpt; with it, the prompt carries no pedal from after the cut."""
    cut = float(seconds)
    out = score.to("second").copy()
    for track in out.tracks:
        track.notes = track.notes.filter(lambda n: n.time < cut, inplace=False)
        track.pitch_bends = track.pitch_bends.filter(lambda b: b.time < cut, inplace=False)
        track.controls = track.controls.filter(lambda c: c.time < cut, inplace=False)
        track.controls.sort()
        pedal = [c.value for c in track.controls if c.number == SUSTAIN_CC]
        if pedal and pedal[-1] >= 64:
            track.controls.append(symusic.ControlChange(cut, SUSTAIN_CC, 0, ttype="second"))
        track.pedals = track.pedals.filter(lambda p: p.time < cut, inplace=False)
    return out
