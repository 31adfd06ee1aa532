"""SCG rule functions: values, own-target zero, chord names, batching, agreement with decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import scale_notes, write_midi

from mehldau.guidance.rules import (
    NO_CHORD,
    QUALITIES,
    RULES,
    chord_label,
    chord_mismatch,
    chord_name,
    chord_scores,
    chords,
    extract_targets,
    note_density,
    pitch_histogram,
    rule_losses,
    rule_scales,
    targets_from_midi,
    weighted_loss,
)
from mehldau.tokenize.pianoroll import (
    PianoRollTokenizer,
    render,
    roll_to_tensor,
    tensor_to_roll,
)


def _roll(notes: list[tuple[int, int, int]], n_frames: int, velocity: int = 80) -> torch.Tensor:
    """(pitch, start_frame, end_frame) notes -> (2, T, 88) float roll."""
    pitch, start, end = (np.array([n[i] for n in notes], np.int64) for i in range(3))
    return roll_to_tensor(render(start, end, pitch, np.full(len(notes), velocity), n_frames))


def _chord_roll(voicings: list[list[int]], window: int = 128) -> torch.Tensor:
    """One voicing per window, held for most of it and struck twice (re-strikes change nothing)."""
    notes = [(p, w * window + s, w * window + e) for w, v in enumerate(voicings) for p in v
             for s, e in ((0, 60), (60, 120))]
    return _roll(notes, window * len(voicings))


def _progression() -> torch.Tensor:
    return _chord_roll([[48, 52, 55, 64], [45, 57, 60, 64], [43, 53, 59, 62], [50, 53, 57, 60]])


def test_chord_recogniser_names_triads_and_sevenths():
    voicings = {
        "C": [48, 52, 55, 60], "Am": [57, 60, 64, 69], "G7": [43, 53, 59, 62],
        "Cmaj7": [48, 55, 59, 64], "Am7": [45, 55, 60, 64], "Dm7": [50, 53, 57, 60],
        "Bm7b5": [47, 53, 57, 62], "Fm": [53, 56, 60],
        "Cdim7": [51, 54, 57, 60],  # Eb-Gb-A-C: symmetric, the tie goes to the lowest root
        "Gsus4": [55, 60, 62], "Bb7": [46, 50, 53, 56],
    }
    roll = _chord_roll([*voicings.values(), []])  # and a silent window
    labels = chords(roll[None])[0].tolist()
    assert [chord_name(x) for x in labels] == [*voicings, "N"]
    # First inversion C (E-G-C) with a passing D in the melody is still C.
    inv = _roll([(52, 0, 128), (55, 0, 128), (60, 0, 128), (74, 50, 60)], 128)
    assert chord_name(int(chords(inv[None])[0, 0])) == "C"


def test_chord_labels_and_names_are_inverse():
    for label in range(-1, 12 * len(QUALITIES)):
        assert chord_label(chord_name(label)) == label
    assert chord_label("F#m7") == chord_label("Gbm7") and chord_label("N") == NO_CHORD
    with pytest.raises(ValueError):
        chord_label("H7")


def test_pitch_histogram_and_note_density_values():
    # C4 for 30 frames, G4 for 10; then a three-note chord struck once and held.
    roll = _roll([(60, 0, 30), (67, 30, 40), (48, 100, 200), (52, 100, 200), (55, 100, 200)],
                 200)
    hist = pitch_histogram(roll[None])[0]
    assert hist.tolist() == pytest.approx(
        [130 / 340, 0, 0, 0, 100 / 340, 0, 0, 110 / 340, 0, 0, 0, 0])
    density = note_density(roll[None], window=100, fps=100)[0]  # (2, W)
    assert density[0].tolist() == pytest.approx([0.4, 3.0])  # sounding keys per frame
    assert density[1].tolist() == pytest.approx([2.0, 1.0])  # onset frames per second
    # A shorter last window counts its own frames: 3 keys a frame, 1 onset in 0.4 s.
    short = note_density(roll[None, :, :140], window=100, fps=100)[0]
    assert short[:, 1].tolist() == pytest.approx([3.0, 2.5])
    assert pitch_histogram(torch.zeros(1, 2, 10, 88)).abs().sum() == 0


@pytest.mark.parametrize("rule", list(RULES))
def test_rule_is_zero_on_its_target_and_positive_elsewhere(rule):
    ref = _progression()
    other = _chord_roll([[50, 53, 57], [43, 53, 59, 62, 65], [48, 52, 55, 59], [48, 51]])
    targets = extract_targets(ref, [rule])
    loss = rule_losses(torch.stack([ref, other]), targets)[rule]
    assert loss.shape == (2,) and loss[0] < 1e-6 and loss[1] > 0


def test_batched_losses_equal_one_at_a_time():
    ref = _progression()
    g = torch.Generator().manual_seed(1)
    batch = torch.stack([ref, ref.flip(1), (ref + 0.3 * torch.rand(ref.shape, generator=g)),
                         torch.zeros_like(ref)])
    targets = extract_targets(ref)
    together = rule_losses(batch, targets)
    for i in range(len(batch)):
        alone = rule_losses(batch[i:i + 1], targets)
        for name in RULES:
            torch.testing.assert_close(together[name][i:i + 1], alone[name])


def test_rules_read_what_decode_plays():
    """A continuous roll with no onset flags, as a model might emit: the rules count the notes
    the decoder would write, at the same sounding threshold."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 2, 256, 88, generator=g) * torch.tensor([0.6 / 127, 0.4]).view(2, 1, 1)
    x[0, 0, 10:50, 39] = 0.7  # two notes of one pitch, separated by a silent frame
    x[0, 0, 51:90, 39] = 0.7
    x[0, 0, 20:200, 43] = 0.3
    roll = tensor_to_roll(x[0])
    notes = PianoRollTokenizer().decode(roll).tracks[0].notes.numpy()
    onset_frames = len(np.unique(notes["time"] // 10))
    density = note_density(x, window=256, fps=100)[0]
    assert density[1, 0] * 2.56 == pytest.approx(onset_frames)
    sounding = (notes["duration"] // 10).sum()
    assert density[0, 0] * 256 == pytest.approx(sounding)
    assert onset_frames > 3  # the noise above half a velocity step made notes too


def test_shape_mismatch_and_unknown_rule_raise():
    targets = extract_targets(_progression())
    with pytest.raises(ValueError, match="note_density"):
        rule_losses(torch.zeros(1, 2, 128, 88), targets, ["note_density"])
    with pytest.raises(ValueError, match="unknown rule"):
        extract_targets(_progression(), ["tempo"])
    with pytest.raises(ValueError):
        pitch_histogram(torch.zeros(1, 3, 128, 88))


def test_targets_from_midi(tmp_path):
    path = write_midi(tmp_path / "t.mid", scale_notes(8, base=60))  # 2 s of music
    tok = PianoRollTokenizer()
    targets = targets_from_midi(path, tok, seconds=2.56, start=0.5)
    assert targets["note_density"].shape == (2, 2) and targets["chord"].shape == (2,)
    roll = roll_to_tensor(tok.encode_file(path)[50:306])
    expected = extract_targets(torch.cat([roll, torch.zeros(2, 256 - roll.shape[1], 88)], 1))
    for name in RULES:
        torch.testing.assert_close(targets[name], expected[name])
    assert targets["note_density"][0, 1] < targets["note_density"][0, 0]  # the end is silent


def test_chord_loss_is_graded_and_zero_exactly_when_labels_agree():
    """C major target: C-E-G is 0; C-E-A (Am, but C and E still in it) is closer than F#-A#-C#;
    silence against a chord and a chord against silence are both 1. The 0-1 mismatch of the
    reference cannot tell the two wrong voicings apart."""
    target = chords(_chord_roll([[48, 52, 55], [48, 52, 55], [], [48, 52, 55]])[None])[0]
    assert chord_name(int(target[0])) == "C" and int(target[2]) == NO_CHORD
    cands = torch.stack([_chord_roll(v) for v in (
        [[48, 52, 55], [48, 52, 55], [], [48, 52, 55]],      # the same
        [[48, 52, 57], [48, 52, 55], [], [48, 52, 55]],      # Am in window 0
        [[54, 58, 61], [48, 52, 55], [], [48, 52, 55]],      # F# in window 0
        [[], [48, 52, 55], [60], [48, 52, 55]])])            # silent 0, a note in silent 2
    loss = rule_losses(cands, {"chord": target}, ["chord"])["chord"]
    assert loss[0] == 0 and 0 < loss[1] < loss[2] == pytest.approx(0.25)  # no C-E-G at all
    assert loss[3] == pytest.approx(0.5)  # two of four windows wholly wrong
    mismatch = chord_mismatch(chord_scores(cands), target)
    assert mismatch.tolist() == [0.0, 0.25, 0.25, 0.5]


def test_weighted_loss_scales_and_candidate_z_scores():
    losses = {"a": torch.tensor([1.0, 3.0, 2.0, 6.0]), "b": torch.tensor([0.1, 0.0, 0.3, 0.2])}
    assert torch.equal(weighted_loss(losses, {}), losses["a"] + losses["b"])
    scales = rule_scales(losses)
    assert scales == pytest.approx({"a": 3.0, "b": 0.15})
    scaled = weighted_loss(losses, {"b": 2.0}, scales)
    assert torch.allclose(scaled, losses["a"] / 3 + 2 * losses["b"] / 0.15)
    # Candidate-major rows, 2 samples: candidates of sample 0 are rows 0, 2; of sample 1: 1, 3.
    z = weighted_loss(losses, {}, groups=2)
    assert torch.allclose(z, torch.tensor([-2.0, -2.0, 2.0, 2.0]))  # rows 0, 1 lead their own
    assert rule_scales({"c": torch.zeros(3)})["c"] > 0  # a rule already perfect unguided
