"""Rule functions for Stochastic Control Guidance (Huang et al., ICML 2024, arXiv 2402.14285).

SCG scores each candidate x0 by plain, non-differentiable rules: score = -sum_r w_r loss_r
(reference weights in `REFERENCE_WEIGHTS`; `weighted_loss` divides each loss by its unguided
level first, so that rules on different scales all steer). Here every rule is a pair
(extract, loss) in `RULES`: `extract(rolls, window, fps)` maps rolls `(n, 2, T, 88)`
(channel 0 velocity / 127, channel 1 onset, as `roll_to_tensor` makes them) to features
`(n, ...)`, and `loss(features, target)` gives `(n,)`. All work on a whole batch of
candidates at once, on any device.

What a rule sees is what `PianoRollTokenizer.decode` would play: frames and onsets come from
`pianoroll.quantize` (a frame sounds iff channel 0 >= 0.5 / 127; onset flags > 0.5), and a note
starts at a sounding frame with an onset flag or after a silent frame, the decoder's rule.
Windows are `window` frames (128 = 1.28 s at 100 fps, the reference's, 8 per 10.24 s sample);
a last, shorter window counts its own frames.

- `pitch_histogram`: 12-bin pitch-class histogram of sounding frames (so a note counts by its
  duration), normalised to sum 1 (all zero for silence); loss: MSE over the 12 bins. The
  reference sums velocities instead of counting frames; counting makes the histogram a property
  of the notes, not of how loudly they are played.
- `note_density`: per window, vertical = mean number of sounding keys per frame, horizontal =
  frames in which at least one note starts, per second; features `(2, W)`; loss: MSE over
  them. The reference counts the same frames per 1.28 s window and divides by 5, i.e. it
  reports 0.256 x our onsets per second: weights tuned on it need rescaling.
- `chord`: per window, a chord label from our own template matcher; the target is a label
  per window, and the loss how far the target chord falls short of being the window's best
  match ((best score - target's) / best score, 0 exactly when the labels agree; averaged over
  windows). The reference's loss is the 0-1 mismatch rate (`chord_mismatch`, still
  reported): it gives SCG nothing to choose by while every candidate misses every chord,
  which is the case early in sampling. The reference runs music21 key analysis and
  Roman numerals and keeps only the scale degree, which jazz defeats twice: key detection is
  unreliable over ii-V-I chains, and quality and sevenths (the point of jazz harmony) are
  dropped. We name the chord itself, key-free: 12 roots x `QUALITIES` (triads, the four
  common sevenths, diminished seventh, sus4), label = root * len(QUALITIES) + quality, -1 for a
  silent window. The window's chroma (sounding frames per pitch class) is matched to binary
  templates by cosine similarity, which prefers the template that covers the notes without
  extra tones (C-E-G is C, not Cmaj7; C-E-G-B is Cmaj7, not Em). Ties go to the lowest label.
  Sets that are equal as pitch classes read as one chord (A-C-E-G is Am7, there is no C6), and
  a rootless voicing reads as the chord it spells (F-A-C-E is Fmaj7, not Dm9): target and
  candidates go through the same matcher, so the loss still compares like with like.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from mehldau.errors import UserError
from mehldau.tokenize.pianoroll import (
    MIN_PITCH,
    NUM_KEYS,
    PianoRollTokenizer,
    crop,
    quantize,
    roll_to_tensor,
)

WINDOW = 128  # frames per window: the reference's 1.28 s at 100 fps
FPS = 100.0
REFERENCE_WEIGHTS = {"pitch_histogram": 40.0, "note_density": 1.0, "chord": 1.0}
ROOTS = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
QUALITIES: dict[str, tuple[int, ...]] = {  # chord-symbol suffix -> intervals above the root
    "": (0, 4, 7), "m": (0, 3, 7), "dim": (0, 3, 6), "sus4": (0, 5, 7),
    "7": (0, 4, 7, 10), "maj7": (0, 4, 7, 11), "m7": (0, 3, 7, 10), "m7b5": (0, 3, 6, 10),
    "dim7": (0, 3, 6, 9),
}
NO_CHORD = -1
_NATURALS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}


# --- shared views of a roll ------------------------------------------------------------------
def _frames(rolls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 2, T, 88) -> sounding (n, T, 88) and note starts (n, T, 88), as `decode` reads them."""
    if rolls.dim() != 4 or rolls.shape[1] != 2 or rolls.shape[3] != NUM_KEYS:
        raise ValueError(f"rules take rolls of shape (n, 2, T, {NUM_KEYS}), got "
                         f"{tuple(rolls.shape)}")
    velocity, onset = quantize(rolls)
    active = velocity > 0
    prev = torch.zeros_like(active)
    prev[:, 1:] = active[:, :-1]
    return active, active & (onset | ~prev)


def _windows(x: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, T, ...) -> (n, W, window, ...) zero-padded, and each window's frame count (W,)."""
    n_frames = x.shape[1]
    if n_frames == 0 or window < 1:
        raise ValueError(f"need at least one frame and window >= 1, got T={n_frames}, "
                         f"window={window}")
    n_windows = math.ceil(n_frames / window)
    pad = torch.zeros((x.shape[0], n_windows * window - n_frames, *x.shape[2:]),
                      dtype=x.dtype, device=x.device)
    x = torch.cat([x, pad], 1).view(x.shape[0], n_windows, window, *x.shape[2:])
    lengths = (n_frames - torch.arange(n_windows, device=x.device) * window).clamp(max=window)
    return x, lengths


def _chroma(active: torch.Tensor) -> torch.Tensor:
    """(..., 88) sounding counts -> (..., 12) per pitch class (integers, exact in float32)."""
    pitch_class = (torch.arange(NUM_KEYS, device=active.device) + MIN_PITCH) % 12
    one_hot = torch.nn.functional.one_hot(pitch_class, 12).float()  # (88, 12)
    return active.float() @ one_hot


# --- rules: features -------------------------------------------------------------------------
def pitch_histogram(rolls: torch.Tensor, window: int = WINDOW, fps: float = FPS) -> torch.Tensor:
    """(n, 2, T, 88) -> (n, 12) pitch-class share of sounding frames (window, fps unused)."""
    active, _ = _frames(rolls)
    hist = _chroma(active.sum(1))  # (n, 12)
    return hist / hist.sum(-1, keepdim=True).clamp_min(1.0)


def note_density(rolls: torch.Tensor, window: int = WINDOW, fps: float = FPS) -> torch.Tensor:
    """(n, 2, T, 88) -> (n, 2, W): mean sounding keys per frame, onset frames per second."""
    active, starts = _frames(rolls)
    active, lengths = _windows(active, window)  # (n, W, window, 88), (W,)
    starts, _ = _windows(starts.any(-1), window)  # (n, W, window)
    vertical = active.sum((2, 3)) / lengths
    horizontal = starts.sum(2) / (lengths / fps)
    return torch.stack([vertical, horizontal], 1).float()


def _templates(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(12 * Q, 12) binary chord templates, root-major, and 1 / their norms (12 * Q,)."""
    base = torch.zeros(len(QUALITIES), 12)
    for q, intervals in enumerate(QUALITIES.values()):
        base[q, list(intervals)] = 1.0
    templates = torch.stack([base.roll(root, -1) for root in range(12)]).view(-1, 12)
    return templates.to(device), templates.sum(-1).rsqrt().to(device)


def chord_scores(rolls: torch.Tensor, window: int = WINDOW, fps: float = FPS) -> torch.Tensor:
    """(n, 2, T, 88) -> (n, W, 1 + 12 * Q): per window, 1.0 if silent, then how well each
    chord template matches (cosine up to the chroma's own norm, the same for every template
    of a window, so the argmax and score ratios are those of the cosine)."""
    active, _ = _frames(rolls)
    active, _ = _windows(active, window)
    chroma = _chroma(active.sum(2))  # (n, W, 12)
    templates, inv_norm = _templates(rolls.device)
    # Integer dot products keep ties exact whatever the batch size.
    scores = chroma @ templates.T * inv_norm  # (n, W, 12 * Q)
    silent = (chroma.sum(-1) == 0).float()[..., None]  # (n, W, 1)
    return torch.cat([silent, scores], -1)


def chords(rolls: torch.Tensor, window: int = WINDOW, fps: float = FPS) -> torch.Tensor:
    """(n, 2, T, 88) -> (n, W) int64 chord labels (`chord_name`), NO_CHORD when silent."""
    return _labels(chord_scores(rolls, window, fps))


def _labels(scores: torch.Tensor) -> torch.Tensor:
    label = scores[..., 1:].argmax(-1)  # (n, W)
    return torch.where(scores[..., 0] > 0, torch.full_like(label, NO_CHORD), label)


def chord_name(label: int) -> str:
    """Chord label -> symbol ("C", "Am", "G7", "Bm7b5"), "N" for NO_CHORD."""
    if label < 0:
        return "N"
    root, quality = divmod(int(label), len(QUALITIES))
    return ROOTS[root] + list(QUALITIES)[quality]


def chord_label(name: str) -> int:
    """Chord symbol -> label, the inverse of `chord_name` ("F#m7" and "Gbm7" alike), for
    targets written by hand: `torch.tensor([chord_label(c) for c in ("Dm7", "G7", "Cmaj7")])`."""
    if name == "N":
        return NO_CHORD
    accidental = {"b": -1, "#": 1}.get(name[1:2], 0)
    root, quality = name[:1], name[1 + (accidental != 0):]
    if root not in _NATURALS or quality not in QUALITIES:
        raise ValueError(f"unknown chord '{name}': a root A..G, maybe b or #, then one of "
                         f"{', '.join(repr(q) for q in QUALITIES)}; or N")
    return (_NATURALS[root] + accidental) % 12 * len(QUALITIES) + list(QUALITIES).index(quality)


# --- rules: losses ---------------------------------------------------------------------------
def _mse(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (features - target).pow(2).flatten(1).mean(1)


def _chord_shortfall(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per window, how far the target chord falls short of being the window's chord:
    (best score - target's score) / best score, 0 when it is the chord (the label matches);
    1 when only one of the window and the target is silent. Averaged over windows.

    Graded, unlike the 0-1 mismatch (`chord_mismatch`): early in sampling every candidate
    misses every chord, and a 0-1 loss then gives SCG nothing to choose by."""
    silent = scores[..., 0] > 0  # (n, W)
    s = scores[..., 1:]
    best = s.max(-1).values  # (n, W)
    mine = s.gather(-1, target.clamp(min=0).expand_as(best)[..., None])[..., 0]
    shortfall = (best - mine) / best.clamp_min(1e-9)
    wanted_silent = (target < 0).expand_as(silent)
    loss = torch.where(wanted_silent | silent, (wanted_silent != silent).float(), shortfall)
    return loss.flatten(1).mean(1)


def chord_mismatch(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(n,) share of windows whose chord label differs from the target's (the reference's
    chord loss), from `chord_scores` features."""
    return (_labels(scores) != target).float().flatten(1).mean(1)


class Rule(NamedTuple):
    extract: Callable[[torch.Tensor, int, float], torch.Tensor]  # rolls -> (n, ...) features
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # features, target -> (n,)
    # rolls -> (n, ...) targets, when they are not features (chord labels); None = extract
    target: Callable[[torch.Tensor, int, float], torch.Tensor] | None = None


RULES: dict[str, Rule] = {
    "pitch_histogram": Rule(pitch_histogram, _mse),
    "note_density": Rule(note_density, _mse),
    "chord": Rule(chord_scores, _chord_shortfall, chords),
}


def _rule(name: str) -> Rule:
    if name not in RULES:
        raise ValueError(f"unknown rule '{name}'; known: {', '.join(RULES)}")
    return RULES[name]


def extract_targets(roll: torch.Tensor, rules: Sequence[str] = tuple(RULES),
                    window: int = WINDOW, fps: float = FPS) -> dict[str, torch.Tensor]:
    """One reference roll (2, T, 88) -> {rule: target features}, for `rule_losses`."""
    return {name: (_rule(name).target or _rule(name).extract)(roll[None], window, fps)[0]
            for name in rules}


def rule_losses(rolls: torch.Tensor, targets: dict[str, torch.Tensor],
                rules: Sequence[str] | None = None, window: int = WINDOW, fps: float = FPS
                ) -> dict[str, torch.Tensor]:
    """Rolls (n, 2, T, 88) -> {rule: (n,) loss against its target}; `rules` defaults to all
    targets. Rolls must be as long as the target's roll and use the same window and fps."""
    out = {}
    for name in rules if rules is not None else targets:
        rule = _rule(name)
        features = rule.extract(rolls, window, fps)
        target = targets[name].to(features.device)
        if features.shape[1:1 + target.dim()] != target.shape:
            raise ValueError(f"rule '{name}': features {tuple(features.shape[1:])} do not match "
                             f"the target's {tuple(target.shape)}; same length and window?")
        out[name] = rule.loss(features, target)
    return out


def weighted_loss(losses: dict[str, torch.Tensor], weights: dict[str, float],
                  scales: dict[str, float] | None = None, groups: int | None = None
                  ) -> torch.Tensor:
    """SCG's selection score, lower is better: sum over rules of w_r * loss_r / scale_r.

    The rules' losses live on unrelated scales (a pitch histogram's MSE is ~1e-3, note
    density's hundreds, chord mismatch a fraction), so with plain weights the largest one
    decides every selection and the others are not steered. `scales` (see `rule_scales`)
    divides each loss by what unguided sampling reaches, so every rule counts by how much a
    candidate improves it relative to that, and `weights` keep their plain meaning. `groups`
    (the number of samples B) instead z-scores each rule over the n candidates of each
    sample, rows being candidate-major (i * B + b), as SCG passes them."""
    total = None
    for name, loss in losses.items():
        if groups:  # z-score over the candidates of each sample (rows i * groups + b)
            x = loss.view(-1, groups)
            loss = ((x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-9)).flatten()
        term = weights.get(name, 1.0) * loss / (scales or {}).get(name, 1.0)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("weighted_loss needs at least one rule")
    return total


def rule_scales(losses: dict[str, torch.Tensor], floor: float = 1e-6) -> dict[str, float]:
    """Per rule, the mean loss of unguided samples (at least `floor`): the `scales` of
    `weighted_loss`."""
    return {name: max(float(loss.float().mean()), floor) for name, loss in losses.items()}


def targets_from_midi(path: str | Path, tokenizer: PianoRollTokenizer, seconds: float,
                      rules: Sequence[str] = tuple(RULES), start: float = 0.0,
                      window: int = WINDOW) -> dict[str, torch.Tensor]:
    """Targets of the excerpt `start .. start + seconds` of a MIDI file (silence past its end)."""
    fps = tokenizer.config.fps
    roll = crop(tokenizer.encode_file(path), round(start * fps), round(seconds * fps))
    return extract_targets(roll_to_tensor(roll), rules, window, fps)


# --- targets as JSON ------------------------------------------------------------------------
def targets_to_json(targets: dict[str, torch.Tensor]) -> dict:
    """Targets as written beside each output (chords by name, e.g. "Dm7", "N" = silence)."""
    out = {}
    for name, t in targets.items():
        out[name] = ([chord_name(int(v)) for v in t.tolist()] if name == "chord"
                     else t.tolist())
    return out


def targets_from_json(path: str | Path, names: list[str], frames: int, window: int
                      ) -> dict[str, torch.Tensor]:
    try:
        given = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"rules.targets {path}: {e}; pass a JSON file like the ones "
                        "mehldau-generate writes") from e
    given = given.get("targets", given) if isinstance(given, dict) else {}
    out = {}
    windows = -(-frames // window)
    for name in names:
        if name not in given:
            raise UserError(f"rules.targets {path} has no '{name}' target; add it or drop it "
                            "from rules.use")
        v = given[name]
        try:
            t = (torch.tensor([chord_label(str(c)) for c in v]) if name == "chord"
                 else torch.tensor(v, dtype=torch.float32))
        except (TypeError, ValueError) as e:
            raise UserError(f"rules.targets {path}: bad '{name}' target ({e})") from e
        want = {"pitch_histogram": (12,), "note_density": (2, windows), "chord": (windows,)}[name]
        if tuple(t.shape) != want:
            raise UserError(f"rules.targets {path}: '{name}' has shape {tuple(t.shape)}, a "
                            f"{frames}-frame sample needs {want}")
        out[name] = t
    return out
