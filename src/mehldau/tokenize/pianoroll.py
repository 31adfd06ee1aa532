"""Piano rolls for diffusion (SCG: Huang et al., ICML 2024, arXiv 2402.14285), 88 keys x 2 channels.

`encode` gives a `(T, 88, 2)` uint8 roll at `fps` frames per second (100, the reference's
`fs`), rows = MIDI pitches 21..108:

- channel 0 (`VELOCITY`): the note's MIDI velocity (1..127) on every frame it sounds, 0 if silent;
- channel 1 (`ONSET`): 1 on a note's first frame.

The reference stores 3 x 128 x T (velocity, onset, pedal) and forces rows outside 21..108 off;
we keep the 88 piano rows only and fold the sustain pedal into note durations instead of
giving it a channel (`fold_pedal`, with the performance tokenizer's note extraction, so both
tokenizers see the same notes). Times are rounded to the frame grid; a note lasts one frame at
least; of two overlapping notes of one pitch the later onset wins: the earlier one ends where it
begins, and the onset channel keeps the two apart even when they touch.

`decode` starts a note at every sounding frame that carries an onset flag or follows a silent
frame (so a model that forgets an onset flag never loses a note) and ends it at the next silent
frame or next start; an onset flag on a silent frame means nothing. Velocity is the lower median
over the note's frames: exact for encoded rolls, robust to noise in generated ones. A decoded
onset lies within half a frame of the original (plus the MIDI tick rounding): inside one frame.

Model side: `roll_to_tensor` maps rolls to float `(2, T, 88)` in [0, 1] (velocity / 127, onset)
and `tensor_to_roll` back through `quantize`, which rounds velocity to the nearest integer (half
up): a frame sounds iff channel 0 >= 0.5 / 127, and onsets are flags > `threshold` (0.5). The
rules in `mehldau.guidance.rules` use the same `quantize`, so what they measure is exactly what
`decode` turns into notes. The reference instead snaps values below 0.025 to silence; a branch
whose decoder leaves a noise floor should zero it before calling these.

Why hand-written: pretty_midi's `get_piano_roll` has no onset channel (repeated notes of one
pitch merge), adds the velocities of overlapping notes (values above 127), truncates times
instead of rounding, and has no inverse; symusic's `Track.pianoroll` (what miditok uses) has
onset/frame modes but works on a tick grid (beats, not seconds, so rubato and the tempo map
change the frame rate) and has no inverse either; miditok itself has no roll tokenizer.

`vocab_size` is 0 and `special_tokens` empty: a roll has no ids. `seconds_per_id` is the base's
None. Saved as JSON like the other tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import symusic
import torch

from mehldau.errors import UserError
from mehldau.tokenize.base import Tokenizer, register
from mehldau.tokenize.notes import piano_score
from mehldau.tokenize.performance import PerformanceConfig, PerformanceTokenizer

MIN_PITCH, MAX_PITCH = 21, 108  # A0..C8
NUM_KEYS = MAX_PITCH - MIN_PITCH + 1  # 88
VELOCITY, ONSET = 0, 1  # channel indices


@dataclass
class PianoRollConfig:
    fps: int = 100  # frames per second: 10 ms frames as the reference's fs
    fold_pedal: bool = True  # sustain pedal folded into note ends (the reference has a channel)
    # Keep only piano-family tracks when a file has any, as the performance tokenizer does.
    piano_only: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.fps <= 1000:
            raise UserError(f"pianoroll tokenizer: fps must be in 1..1000, got {self.fps}")


@register
class PianoRollTokenizer(Tokenizer):
    """Piano rolls: `encode(score) -> (T, 88, 2) uint8`, `decode(roll) -> Score`."""

    name: ClassVar[str] = "pianoroll"
    step_name: ClassVar[str] = "frame"
    config_class: ClassVar[type] = PianoRollConfig

    def __init__(self, config: PianoRollConfig | None = None) -> None:
        self.config = config if config is not None else PianoRollConfig()
        # Note extraction (tracks, pedal folding, overlap cleaning) is the performance
        # tokenizer's, on its own grid of `fps` steps.
        self._notes = PerformanceTokenizer(PerformanceConfig(
            min_pitch=MIN_PITCH, max_pitch=MAX_PITCH, steps_per_second=self.config.fps,
            piano_only=self.config.piano_only))
        # Decoded MIDI: 120 BPM and a tick grid on which one frame is a whole number of ticks.
        self.ticks_per_frame = math.ceil(1000 / self.config.fps)
        if (self.config.fps * self.ticks_per_frame) % 2:
            self.ticks_per_frame *= 2
        self.decode_tpq = self.config.fps * self.ticks_per_frame // 2

    @property
    def vocab_size(self) -> int:
        return 0  # no ids

    @property
    def special_tokens(self) -> dict[str, int]:
        return {}

    @property
    def event_shape(self) -> tuple[int, ...]:
        return (NUM_KEYS, 2)

    # --- encode --------------------------------------------------------------------------
    def encode(self, score: symusic.Score) -> np.ndarray:
        """Score (any time unit) -> (T, 88, 2) uint8; T = the last note's end frame."""
        if not self.config.fold_pedal:
            score = score.copy()
            for track in score.tracks:  # only CC64 is read from the controls
                track.controls.clear()
        start, end, pitch, velocity = self._notes.grid_notes(score, bins=False)
        return render(start, end, pitch, velocity, int(end.max(initial=0)))

    # --- decode --------------------------------------------------------------------------
    def decode(self, tokens: np.ndarray) -> symusic.Score:
        """Roll -> one-track piano Score (ticks, 120 BPM, `ticks_per_frame` ticks a frame).

        Never raises: anything that is not `(T, 88, 2)` gives an empty score, values are
        clipped to 0..127 (NaN is 0).
        """
        start, end, pitch, velocity = roll_notes(_clean_roll(tokens))
        return piano_score(start, end, pitch, velocity, self.ticks_per_frame, self.decode_tpq)

    def augment(self, tokens: np.ndarray, transpose: int = 0, stretch: float = 1.0) -> np.ndarray:
        """Transpose by semitones (notes pushed off the keyboard are dropped) and stretch time,
        through the notes so onsets stay single frames."""
        if transpose == 0 and stretch == 1.0:
            return tokens
        if not (math.isfinite(stretch) and stretch > 0):
            raise ValueError(f"stretch must be a positive finite number, got {stretch}")
        roll = _clean_roll(tokens)
        start, end, pitch, velocity = roll_notes(roll)
        start = np.floor(start * stretch + 0.5).astype(np.int64)
        end = np.floor(end * stretch + 0.5).astype(np.int64)
        start, end, pitch, velocity = self._notes.clean_notes(
            start, end, pitch + int(transpose), velocity)
        n_frames = max(int(math.floor(len(roll) * stretch + 0.5)), int(end.max(initial=0)))
        return render(start, end, pitch, velocity, n_frames)


# --- roll <-> notes --------------------------------------------------------------------------
def render(start: np.ndarray, end: np.ndarray, pitch: np.ndarray, velocity: np.ndarray,
           n_frames: int) -> np.ndarray:
    """Notes in frames, no two of one pitch overlapping, pitches 21..108 -> (n_frames, 88, 2)."""
    roll = np.zeros((n_frames, NUM_KEYS, 2), np.uint8)
    end = np.minimum(end, n_frames)
    keep = end > start
    start, end, pitch, velocity = start[keep], end[keep], pitch[keep], velocity[keep]
    length = end - start
    note = np.repeat(np.arange(len(start)), length)  # owner of every sounding frame
    frame = start[note] + np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length,
                                                                   length)
    # Notes do not overlap, so no cell is written twice and the fancy assignment is exact.
    roll[frame, pitch[note] - MIN_PITCH, VELOCITY] = velocity[note]
    roll[start, pitch - MIN_PITCH, ONSET] = 1
    return roll


def roll_notes(roll: np.ndarray) -> tuple[np.ndarray, ...]:
    """(T, 88, 2) integer roll -> (start, end, pitch, velocity) int64, in frames, pitch-major."""
    n_frames = roll.shape[0]
    # One row per pitch with a silent frame appended, flattened: runs never cross pitches.
    active = np.zeros((NUM_KEYS, n_frames + 1), bool)
    active[:, :n_frames] = roll[:, :, VELOCITY].T > 0
    onset = np.zeros_like(active)
    onset[:, :n_frames] = roll[:, :, ONSET].T > 0
    active, onset = active.reshape(-1), onset.reshape(-1)
    prev = np.concatenate([[False], active[:-1]])
    starts = active & (onset | ~prev)
    nxt_start = np.concatenate([starts[1:], [False]])
    nxt_active = np.concatenate([active[1:], [False]])
    ends = active & (~nxt_active | nxt_start)  # last frame of each note
    s, e = np.flatnonzero(starts), np.flatnonzero(ends) + 1
    # Velocity: lower median of each note's frames, by sorting (note, velocity) pairs.
    vel = np.zeros((NUM_KEYS, n_frames + 1), np.uint8)
    vel[:, :n_frames] = roll[:, :, VELOCITY].T
    frames = np.flatnonzero(active)
    note = np.cumsum(starts)[frames] - 1  # frames are in note order, each note contiguous
    v = vel.reshape(-1)[frames]
    v = v[np.lexsort((v, note))]
    length = e - s
    velocity = v[np.cumsum(length) - length + (length - 1) // 2].astype(np.int64)
    start = s % (n_frames + 1)
    return start, start + length, s // (n_frames + 1) + MIN_PITCH, velocity


def crop(roll: np.ndarray, start: int, length: int) -> np.ndarray:
    """Frames `start .. start + length` of a roll, padded with silence past its end.

    A note cut at the crop's first frame has no onset flag there; `decode` and the rules
    still start it, since the frame before is (now) silent.
    """
    out = np.zeros((length, *roll.shape[1:]), roll.dtype)
    part = roll[max(start, 0):max(start, 0) + length]
    out[:len(part)] = part
    return out


def _clean_roll(tokens: np.ndarray) -> np.ndarray:
    """Anything -> (T, 88, 2) uint8 in 0..127, or (0, 88, 2) when it is not a roll."""
    try:
        a = np.asarray(tokens)
        if a.ndim != 3 or a.shape[1:] != (NUM_KEYS, 2):
            return np.zeros((0, NUM_KEYS, 2), np.uint8)
        if a.dtype.kind not in "iu":
            a = np.floor(np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=127.0,
                                       neginf=0.0) + 0.5)
        return np.clip(a, 0, 127).astype(np.uint8)
    except (TypeError, ValueError):
        return np.zeros((0, NUM_KEYS, 2), np.uint8)


# --- model side ------------------------------------------------------------------------------
def roll_to_tensor(roll: np.ndarray) -> torch.Tensor:
    """(..., T, 88, 2) uint8 roll -> (..., 2, T, 88) float32 in [0, 1]: velocity / 127, onset."""
    x = torch.as_tensor(np.asarray(roll), dtype=torch.float32).movedim(-1, -3)
    return torch.stack([x[..., VELOCITY, :, :] / 127.0, (x[..., ONSET, :, :] > 0).float()], -3)


def quantize(x: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 2, T, 88) float -> velocity (..., T, 88) int64 in 0..127, onset (..., T, 88) bool.

    Velocity rounds half up (floor(127 v + 0.5), not torch.round's half to even), so a frame
    sounds iff channel 0 >= 0.5 / 127. Onset flags are kept only on sounding frames.
    """
    x = torch.nan_to_num(x.float(), nan=0.0)
    velocity = torch.floor(x[..., VELOCITY, :, :].clamp(0, 1) * 127 + 0.5).long()
    onset = (x[..., ONSET, :, :] > threshold) & (velocity > 0)
    return velocity, onset


def tensor_to_roll(x: torch.Tensor, threshold: float = 0.5) -> np.ndarray:
    """(..., 2, T, 88) float (model output) -> (..., T, 88, 2) uint8 roll for `decode`."""
    velocity, onset = quantize(x.detach().cpu(), threshold)
    return torch.stack([velocity, onset.long()], -1).to(torch.uint8).numpy()


def _shift(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (..., T, 88) moved k frames later in time (k > 0) or earlier (k < 0), False-filled."""
    out = torch.zeros_like(x)
    if k > 0:
        out[..., k:, :] = x[..., :-k, :]
    elif k < 0:
        out[..., :k, :] = x[..., -k:, :]
    else:
        out = x.clone()
    return out


def clean_rolls(x: torch.Tensor, max_gap: int = 0, restrike: int = 0, min_frames: int = 1,
                min_peak: float = 0.0, threshold: float = 0.5) -> torch.Tensor:
    """Generated rolls (..., 2, T, 88) in [0, 1] -> the same rolls with notes a pianist plays.

    A decoder's rolls flicker: a held note dips below the floor for a frame or two, or its
    onset channel fires again a few frames in, and `decode` would play a train of re-struck
    notes; faint smudges, where the decoder is unsure, play as clouds of short notes. Four
    repairs, each off at its default:
    - `max_gap`: a silence of up to `max_gap` frames inside one key is filled (with the
      velocity before it) unless the frame after it carries an onset flag (a real re-strike);
    - `restrike`: an onset flag on a sounding frame within `restrike` frames after another
      start of that key is not a new note (a hand cannot repeat a key that fast);
    - `min_frames`: notes shorter than `min_frames` frames are removed;
    - `min_peak`: notes whose loudest frame stays below `min_peak` (velocity / 127) are
      removed: a note is as sure as its peak, and a smudge never has one (hysteresis: a
      note needs the peak once, then lasts down to the velocity floor).
    The onset channel comes back as exactly the frames where `decode` starts a note, so rules
    and `decode` read the cleaned roll alike. Batched, on the rolls' device.
    """
    x = torch.nan_to_num(x.float(), nan=0.0)
    velocity, onset = quantize(x, threshold)
    vel = x[..., VELOCITY, :, :].clamp(0, 1)
    active = velocity > 0
    T = active.shape[-2]
    if max_gap > 0 and T > 1:
        t = torch.arange(T, device=x.device).view(T, 1).expand_as(active)
        last = torch.where(active, t, -1).cummax(-2).values  # last sounding frame <= t
        nxt = torch.where(active, t, T).flip(-2).cummin(-2).values.flip(-2)  # next >= t
        flag_after = onset.gather(-2, nxt.clamp(max=T - 1))
        fill = ~active & (last >= 0) & (nxt < T) & (nxt - last - 1 <= max_gap) & ~flag_after
        vel = torch.where(fill, vel.gather(-2, last.clamp(min=0)), vel)
        active = active | fill
    prev = _shift(active, 1)
    starts = active & (onset | ~prev)
    if restrike > 0:
        recent = torch.zeros_like(starts)
        for k in range(1, restrike + 1):
            recent |= _shift(starts, k)
        starts = starts & ~(prev & recent)
    if min_frames > 1:
        lasting = active.clone()  # the note begun here still sounds k frames later
        for k in range(1, min_frames):
            lasting &= _shift(active & ~starts, -k)
        short = starts & ~lasting
        doomed = short.clone()
        for _ in range(1, min_frames):
            short = _shift(short, 1) & active & ~starts
            doomed |= short
        active = active & ~doomed
        starts = starts & ~doomed
    if min_peak > 0:
        active = active & (_note_peaks(active, starts, vel) >= min_peak)
        starts = starts & active
    return torch.stack([vel * active, starts.float()], -3)


def _note_peaks(active: torch.Tensor, starts: torch.Tensor, vel: torch.Tensor) -> torch.Tensor:
    """(..., T, 88) -> each sounding frame's note's loudest velocity (0 where silent)."""
    a, s, v = (t.movedim(-1, -2).reshape(-1, t.shape[-2]) for t in (active, starts, vel))
    rows, T = a.shape  # one row per key of every roll
    note = s.long().cumsum(-1) + torch.arange(rows, device=a.device)[:, None] * (T + 1)
    peak = torch.zeros(rows * (T + 1), device=v.device, dtype=v.dtype)
    peak = peak.scatter_reduce(0, note[a], v[a], reduce="amax")
    out = torch.where(a, peak[note], torch.zeros_like(v))
    return out.view(*active.shape[:-2], active.shape[-1], T).movedim(-2, -1)
