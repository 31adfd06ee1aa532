"""Clips no pianist played: what the style judge's "unlike any pianist" class learns from.

A classifier trained on pianists alone must name a pianist for anything, random notes
included, so a judge without a way to say "none of them" can be fooled by music that merely
sits near one class in its space. Open-set recognition's usual answer is a background
class trained on synthetic negatives; here the negatives are made on the fly from real
training clips, each by one *family* of damage that keeps some of the music and breaks the
rest, so the class has to learn what playing is rather than what one defect looks like:

- `random_notes`: as many notes as the clip, at random onsets and pitches (the clip's own
  durations and velocities, drawn with replacement);
- `shuffled_pitches`: the pitches dealt among the notes, rhythm, durations and touch kept
  (the listening test's anchor is made this way);
- `shuffled_onsets`: the notes in their order, pitches kept, at new random onsets (rhythm
  gone, the pitch sequence kept);
- `quantized`: onsets and lengths snapped to an eighth-note grid at a random tempo, every
  note at the clip's mean velocity (a notation program's playback);
- `held_clusters`: every note held 2–6 s with two to four neighbouring keys added (the held
  note clusters a badly sampled model leaves);
- `one_voice`: the top voice alone (a melody without hands), or one to three notes;
- `soft_sparse`: velocities scaled to 25–60 % and 30–70 % of the notes dropped (the quiet,
  thin renderings a weak generator makes).

A judge is evaluated on a family it never trained on (`leave one family out`), so its
rejection is not a lookup of the seven defects above. Every function takes a clip's notes
`(N, 4)` (onset, end, pitch, velocity, seconds from the clip's start), its length and a
generator, and returns new notes in the same frame; none raises on an empty clip.

Hand-written: the damages are this project's definitions, a few lines each on numpy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mehldau.tokenize.note_list import END, MAX_PITCH, MIN_PITCH, ONSET, PITCH, VELOCITY

Damage = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _sorted(notes: np.ndarray) -> np.ndarray:
    notes = notes.astype(np.float32).reshape(-1, 4)
    return notes[np.lexsort((notes[:, PITCH], notes[:, ONSET]))]


def _lengths(notes: np.ndarray) -> np.ndarray:
    return np.maximum(notes[:, END] - notes[:, ONSET], 0.02)


def random_notes(notes: np.ndarray, seconds: float, rng: np.random.Generator) -> np.ndarray:
    n = max(len(notes), 1)
    lengths = rng.choice(_lengths(notes), n) if len(notes) else np.full(n, 0.3)
    velocity = rng.choice(notes[:, VELOCITY], n) if len(notes) else np.full(n, 64.0)
    onset = rng.uniform(0, seconds, n)
    pitch = rng.integers(MIN_PITCH, MAX_PITCH + 1, n)
    return _sorted(np.stack([onset, onset + lengths, pitch, velocity], 1))


def shuffled_pitches(notes: np.ndarray, seconds: float, rng: np.random.Generator
                     ) -> np.ndarray:
    out = notes.copy()
    if len(out) > 1:
        for _ in range(8):  # a permutation that changes something, where one can
            perm = rng.permutation(out[:, PITCH])
            if (perm != out[:, PITCH]).any() or len(set(out[:, PITCH])) == 1:
                break
        out[:, PITCH] = perm
    return _sorted(out)


def shuffled_onsets(notes: np.ndarray, seconds: float, rng: np.random.Generator
                    ) -> np.ndarray:
    out = notes.copy()
    lengths = _lengths(out)
    onset = np.sort(rng.uniform(0, seconds, len(out)))  # in the notes' own order
    out[:, ONSET], out[:, END] = onset, onset + lengths
    return _sorted(out)


def quantized(notes: np.ndarray, seconds: float, rng: np.random.Generator) -> np.ndarray:
    if not len(notes):
        return notes.copy()
    grid = 60.0 / float(rng.uniform(80, 220)) / 2  # an eighth note
    onset = np.round(notes[:, ONSET] / grid) * grid
    length = np.maximum(np.round(_lengths(notes) / grid), 1) * grid
    velocity = np.full(len(notes), round(float(notes[:, VELOCITY].mean())))
    out = np.stack([onset, onset + length, notes[:, PITCH], velocity], 1)
    _, first = np.unique(out[:, [ONSET, PITCH]], axis=0, return_index=True)
    return _sorted(out[np.sort(first)])  # one note per key and grid point


def held_clusters(notes: np.ndarray, seconds: float, rng: np.random.Generator) -> np.ndarray:
    if not len(notes):
        return notes.copy()
    rows = []
    for on, _, pitch, vel in notes:
        hold = float(rng.uniform(2.0, 6.0))
        extra = rng.choice([-2, -1, 1, 2, 3], int(rng.integers(2, 5)), replace=False)
        for p in [pitch, *(pitch + extra)]:
            if MIN_PITCH <= p <= MAX_PITCH:
                rows.append((on, on + hold, p, vel))
    return _sorted(np.array(rows))


def one_voice(notes: np.ndarray, seconds: float, rng: np.random.Generator) -> np.ndarray:
    if not len(notes):
        return notes.copy()
    if rng.random() < 0.5:  # near-silent: one to three of the clip's notes
        keep = rng.choice(len(notes), min(len(notes), int(rng.integers(1, 4))), replace=False)
        return _sorted(notes[np.sort(keep)])
    # the top voice: of notes starting within 30 ms of each other the highest, each cut
    # where the next starts, so one key at a time sounds
    top, group_start = [], -1.0
    for note in notes:
        if top and note[ONSET] - group_start < 0.03:
            if note[PITCH] > top[-1][PITCH]:
                top[-1] = note.copy()
            continue
        top.append(note.copy())
        group_start = float(note[ONSET])
    out = np.array(top)
    out[:-1, END] = np.minimum(out[:-1, END], out[1:, ONSET])
    return _sorted(out)


def soft_sparse(notes: np.ndarray, seconds: float, rng: np.random.Generator) -> np.ndarray:
    if not len(notes):
        return notes.copy()
    out = notes[rng.random(len(notes)) < float(rng.uniform(0.3, 0.7))].copy()
    if not len(out):
        out = notes[[int(rng.integers(len(notes)))]].copy()
    out[:, VELOCITY] = np.maximum(np.round(out[:, VELOCITY] * rng.uniform(0.25, 0.6)), 1)
    return _sorted(out)


FAMILIES: dict[str, Damage] = {f.__name__: f for f in (
    random_notes, shuffled_pitches, shuffled_onsets, quantized, held_clusters, one_voice,
    soft_sparse)}


def damage(notes: np.ndarray, seconds: float, family: str, rng: np.random.Generator
           ) -> np.ndarray:
    """`notes` of one clip damaged by `family` (one of `FAMILIES`), inside [0, seconds)."""
    out = FAMILIES[family](notes, seconds, rng)
    return out[out[:, ONSET] < seconds] if len(out) else out


def check_families(names, what: str = "judge.abstain.families") -> list[str]:
    """The names, each one of `FAMILIES`, in order and once; a bad one is one line."""
    names = list(names)
    bad = [n for n in names if n not in FAMILIES]
    if bad or len(set(names)) != len(names):
        from mehldau.errors import UserError

        why = f"unknown family {bad[0]!r}" if bad else "a family is named twice"
        raise UserError(f"{what}: {why}; choose from {', '.join(FAMILIES)}")
    return names
