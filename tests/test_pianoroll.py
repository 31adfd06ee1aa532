"""Piano-roll tokenizer: layout, MIDI round trips, pedal, model-side tensors, saving."""

from __future__ import annotations

import numpy as np
import pytest
import symusic
import torch
from conftest import scale_notes, write_midi

from mehldau.tokenize import load_tokenizer
from mehldau.tokenize.pianoroll import (
    ONSET,
    VELOCITY,
    PianoRollConfig,
    PianoRollTokenizer,
    clean_rolls,
    crop,
    roll_notes,
    roll_to_tensor,
    tensor_to_roll,
)


def _notes(score: symusic.Score) -> list[tuple[int, float, float, int]]:
    """(pitch, start_s, end_s, velocity) of every note, sorted by start then pitch."""
    notes = [(n.pitch, n.time, n.end, n.velocity)
             for t in score.to("second").tracks for n in t.notes]
    return sorted(notes, key=lambda n: (n[1], n[0]))


def _assert_close(got: list, want: list, tol: float) -> None:
    assert len(got) == len(want)
    for (gp, gs, ge, gv), (wp, ws, we, wv) in zip(got, want):
        assert (gp, gv) == (wp, wv)
        assert abs(gs - ws) <= tol and abs(ge - we) <= tol


@pytest.mark.parametrize("fps", [100, 50])
def test_midi_round_trip(tmp_path, fps):
    # 100 BPM and off-grid times: seconds come from the tempo map and get rounded.
    notes = [(p, s + 0.0037, d, v) for p, s, d, v in scale_notes(24, base=57)]
    path = write_midi(tmp_path / "a.mid", notes, tempo=100.0)
    tok = PianoRollTokenizer(PianoRollConfig(fps=fps))
    roll = tok.encode_file(path)
    assert roll.dtype == np.uint8 and roll.shape[1:] == tok.event_shape == (88, 2)
    original = _notes(symusic.Score(str(path)))
    _assert_close(_notes(tok.decode(roll)), original, tol=1.0 / fps + 1e-3)


def test_layout_and_keyboard_range():
    tok = PianoRollTokenizer()
    score = symusic.Score(500)  # 120 BPM default: 1000 ticks a second, 10 ticks a frame
    track = symusic.Track(program=0)
    for time, dur, pitch, vel in [(0, 50, 21, 90), (100, 30, 108, 7), (0, 500, 20, 50),
                                  (0, 500, 109, 50)]:
        track.notes.append(symusic.Note(time, dur, pitch, vel))
    score.tracks.append(track)
    roll = tok.encode(score)
    assert roll.shape == (13, 88, 2)  # the off-keyboard notes are gone, with their length
    assert roll[:5, 0, VELOCITY].tolist() == [90] * 5 and roll[5:, 0, VELOCITY].sum() == 0
    assert roll[:, 0, ONSET].tolist() == [1] + [0] * 12
    assert roll[10:13, 87, VELOCITY].tolist() == [7] * 3 and roll[10, 87, ONSET] == 1
    assert roll[:, 1:87].sum() == 0


def test_repeated_same_pitch_notes_stay_separate(tmp_path):
    notes = [(60, 0.0, 0.5, 80), (60, 0.25, 0.5, 90),  # overlapping: the later onset wins
             (62, 1.0, 0.2, 70), (62, 1.2, 0.2, 75)]  # touching: one unbroken run of frames
    tok = PianoRollTokenizer()
    roll = tok.encode_file(write_midi(tmp_path / "r.mid", notes))
    assert (roll[100:140, 62 - 21, VELOCITY] > 0).all()
    got = _notes(tok.decode(roll))
    _assert_close(got, [(60, 0.0, 0.25, 80), (60, 0.25, 0.75, 90),
                        (62, 1.0, 1.2, 70), (62, 1.2, 1.4, 75)], tol=0.011)


def test_pedal_folds_into_durations(tmp_path):
    path = write_midi(tmp_path / "p.mid", [(60, 0.0, 0.2, 80), (64, 1.5, 0.2, 80)],
                      pedals=[(0.1, 1.0)])
    for fold, end in ((True, 1.1), (False, 0.2)):  # folded: released with the pedal at 1.1 s
        tok = PianoRollTokenizer(PianoRollConfig(fold_pedal=fold))
        roll = tok.encode_file(path)
        assert (roll[:, 60 - 21, VELOCITY] > 0).sum() == round(end * 100)
        assert _notes(tok.decode(roll))[0][2] == pytest.approx(end)


def test_tensor_round_trip_survives_noise_below_thresholds(tmp_path):
    tok = PianoRollTokenizer()
    roll = tok.encode_file(write_midi(tmp_path / "n.mid", scale_notes(16)))
    x = roll_to_tensor(roll)
    assert x.shape == (2, len(roll), 88) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(x.shape, generator=g) * 2 - 1
    noisy = x + noise * torch.tensor([0.49 / 127, 0.49]).view(2, 1, 1)
    assert np.array_equal(tensor_to_roll(noisy), roll)
    # Half a velocity step more and silent frames start to sound: the threshold is real.
    louder = x.clone()
    louder[0] += 0.51 / 127
    assert not np.array_equal(tensor_to_roll(louder), roll)
    # Batched: leading dimensions are kept.
    assert np.array_equal(tensor_to_roll(torch.stack([x, x])), np.stack([roll, roll]))


def test_notes_survive_missing_onset_flags():
    """A model that draws the sounding frames but no onset flags still yields every note."""
    x = torch.zeros(2, 30, 88)
    x[0, 0:10, 39] = 0.5
    x[0, 15:20, 39] = 0.25
    x[0, 5:25, 43] = 1.0
    x[1, 7, 43] = 0.9  # a re-strike inside a held note splits it
    x[1, 27, 50] = 1.0  # an onset on a silent frame is ignored
    got = _notes(PianoRollTokenizer().decode(tensor_to_roll(x)))
    _assert_close(got, [(60, 0.0, 0.1, 64), (64, 0.05, 0.07, 127), (64, 0.07, 0.25, 127),
                        (60, 0.15, 0.2, 32)], tol=1e-6)


def test_decode_never_raises_and_takes_median_velocity():
    tok = PianoRollTokenizer()
    for junk in ([1, 2, 3], np.zeros((4, 88)), np.full((3, 88, 2), np.nan), "roll", None):
        assert tok.decode(junk).note_num() == 0
    roll = np.zeros((5, 88, 2), np.float32)
    roll[:, 10, VELOCITY] = [60, 200, 62, 61, -3]  # clipped to 127 and 0
    notes = _notes(tok.decode(roll))
    assert [(p, v) for p, _, _, v in notes] == [(31, 61)] and notes[0][2] == pytest.approx(0.04)


def test_crop_pads_and_restarts_cut_notes():
    roll = np.zeros((50, 88, 2), np.uint8)
    roll[10:40, 5] = [80, 0]
    roll[10, 5, ONSET] = 1
    part = crop(roll, 20, 40)
    assert part.shape == (40, 88, 2) and part[20:, 5, VELOCITY].sum() == 0
    assert _notes(PianoRollTokenizer().decode(part))[0][:2] == (26, 0.0)


def test_augment_transposes_and_stretches():
    tok = PianoRollTokenizer()
    roll = np.zeros((20, 88, 2), np.uint8)
    roll[0:10, 0] = [70, 0]
    roll[10:20, 80] = [90, 0]
    roll[[0, 10], [0, 80], ONSET] = 1
    up = tok.augment(roll, transpose=8)  # pitch 101 -> 109 falls off the keyboard
    assert (up[0:10, 8, VELOCITY] == 70).all() and up[:, 80:].sum() == 0
    slow = tok.augment(roll, stretch=2.0)
    assert len(slow) == 40 and np.flatnonzero(slow[:, :, ONSET].any(1)).tolist() == [0, 20]


def test_save_load_and_interface(tmp_path):
    tok = PianoRollTokenizer(PianoRollConfig(fps=50, fold_pedal=False, piano_only=False))
    tok.save(tmp_path / "tokenizer.json")
    back = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(back, PianoRollTokenizer) and back == tok and back != PianoRollTokenizer()
    assert back.config_hash() == tok.config_hash() != PianoRollTokenizer().config_hash()
    assert (tok.vocab_size, tok.special_tokens, tok.seconds_per_id()) == (0, {}, None)


def _flicker() -> torch.Tensor:
    """(2, 40, 88): key 10 held 0..21 with a 2-frame dip and onset flags at 0, 3 and 12;
    key 20 a 2-frame blip; key 30 two notes with a 2-frame silence, the second flagged."""
    x = torch.zeros(2, 40, 88)
    x[VELOCITY, 0:21, 10] = 0.5
    x[VELOCITY, 5:7, 10] = 0
    x[ONSET, [0, 3, 12], 10] = 1
    x[VELOCITY, 30:32, 20], x[ONSET, 30, 20] = 0.6, 1
    x[VELOCITY, 0:11, 30], x[VELOCITY, 13:21, 30] = 0.4, 0.4
    x[ONSET, [0, 13], 30] = 1
    return x


def _decoded(x: torch.Tensor) -> list[tuple[int, int, int]]:
    start, end, pitch, _ = roll_notes(tensor_to_roll(x))
    return sorted(zip((pitch - 21).tolist(), start.tolist(), end.tolist()))


@pytest.mark.parametrize("repairs, want", [
    ({}, [(10, 0, 3), (10, 3, 5), (10, 7, 12), (10, 12, 21), (20, 30, 32), (30, 0, 11),
          (30, 13, 21)]),
    ({"max_gap": 2}, [(10, 0, 3), (10, 3, 12), (10, 12, 21), (20, 30, 32), (30, 0, 11),
                      (30, 13, 21)]),
    ({"max_gap": 2, "restrike": 4}, [(10, 0, 12), (10, 12, 21), (20, 30, 32), (30, 0, 11),
                                     (30, 13, 21)]),
    ({"max_gap": 2, "restrike": 12, "min_frames": 3}, [(10, 0, 21), (30, 0, 11), (30, 13, 21)]),
])
def test_clean_rolls_merges_flicker_and_keeps_real_restrikes(repairs, want):
    x = _flicker()
    cleaned = clean_rolls(x[None], **repairs)[0]
    assert _decoded(cleaned) == want
    # The onset channel marks exactly where decode starts notes; cleaning is idempotent.
    assert _decoded(clean_rolls(cleaned[None], **repairs)[0]) == want
    onsets = sorted(map(tuple, torch.nonzero(cleaned[ONSET]).tolist()))
    assert onsets == sorted((s, p) for p, s, _ in want)


def test_clean_rolls_leaves_encoded_music_alone(tmp_path):
    tok = PianoRollTokenizer()
    roll = tok.encode_file(write_midi(tmp_path / "a.mid", scale_notes(40, step=0.2)))
    x = roll_to_tensor(roll)
    assert _decoded(clean_rolls(x[None], max_gap=2, restrike=4, min_frames=3)[0]) == _decoded(x)


def test_clean_rolls_drops_notes_that_never_reach_the_peak():
    x = torch.zeros(2, 40, 88)
    x[VELOCITY, 0:10, 5], x[VELOCITY, 3, 5] = 0.2, 0.6  # faint but one loud frame: kept whole
    x[VELOCITY, 15:25, 6] = 0.2  # a smudge: dropped
    x[VELOCITY, 0:10, 7], x[VELOCITY, 12:20, 7], x[ONSET, 12, 7] = 0.2, 0.9, 1  # faint, loud
    assert _decoded(clean_rolls(x[None], min_peak=0.4)[0]) == [(5, 0, 10), (7, 12, 20)]
    assert len(_decoded(clean_rolls(x[None])[0])) == 4  # off by default
