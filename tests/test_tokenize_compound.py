"""Moonbeam compound tokenizer: spec vocabulary layout, MIDI round trips, labels, garbage."""

from __future__ import annotations

import numpy as np
import pytest
import symusic

from mehldau.errors import UserError
from mehldau.tokenize.base import build_tokenizer, load_tokenizer
from mehldau.tokenize.compound import CompoundConfig, CompoundTokenizer

SOS_ROW, EOS_ROW = [-1] * 6, [-2] * 6


@pytest.fixture
def tok() -> CompoundTokenizer:
    return CompoundTokenizer()


def write_score(path, tracks, tpq=480, tempos=((0, 120.0),)) -> symusic.Score:
    """tracks: list of (program, is_drum, [(onset_s, dur_s, pitch, velocity), ...]).

    Times are given in seconds at the first tempo and written in ticks, so a later tempo change
    moves them; the test compares with symusic's own seconds view of the written file.
    """
    score = symusic.Score(tpq)
    for t, qpm in tempos:
        score.tempos.append(symusic.Tempo(int(t), float(qpm)))
    ticks_per_s = tpq * tempos[0][1] / 60.0
    for program, drum, notes in tracks:
        track = symusic.Track(name="t", program=program, is_drum=drum)
        for on, dur, pitch, vel in notes:
            track.notes.append(symusic.Note(int(round(on * ticks_per_s)),
                                            max(int(round(dur * ticks_per_s)), 1), pitch, vel))
        score.tracks.append(track)
    score.dump_midi(str(path))
    return symusic.Score(str(path))


def notes_in_seconds(score: symusic.Score) -> list[tuple[int, bool, np.ndarray]]:
    """Per track: (program, is_drum, (n, 4) [onset_s, dur_s, pitch, velocity] sorted)."""
    out = []
    for track in score.to("second").tracks:
        n = track.notes.numpy()
        a = np.stack([n["time"], n["duration"], n["pitch"], n["velocity"]], 1).astype(np.float64)
        out.append((track.program, track.is_drum, a[np.lexsort((a[:, 2], a[:, 0]))]))
    return out


# --- vocabulary layout (docs/moonbeam.md §3.6) -----------------------------------------------
def test_vocab_layout_839m(tok):
    assert tok.vocab_size == 8487
    assert tok.event_shape == (6,)
    assert list(tok.offsets) == [1, 4100, 8199, 8212, 8226, 8357]
    assert list(tok.offsets + tok.sos_classes) == [4098, 8197, 8210, 8224, 8355, 8485]
    assert list(tok.offsets + tok.eos_classes) == [4099, 8198, 8211, 8225, 8356, 8486]
    assert list(tok.sos_classes) == [4097, 4097, 11, 12, 129, 128]
    assert list(tok.eos_classes) == [4098, 4098, 12, 13, 130, 129]
    assert (tok.max_shift, tok.max_dur) == (4096, 4096)
    ranges = tok.id_ranges()
    assert [(r.start, r.stop - 1) for r in ranges] == [
        (1, 4099), (4100, 8198), (8199, 8211), (8212, 8225), (8226, 8356), (8357, 8486)]
    assert tok.special_tokens == {"bos": -1, "eos": -2, "pad": -3, "sos_out": 0}


def test_vocab_layout_309m():
    tok = CompoundTokenizer(CompoundConfig.preset("309M"))
    assert tok.vocab_size == 2341
    assert list(tok.offsets) == [1, 1027, 2053, 2066, 2080, 2211]
    assert list(tok.offsets + tok.sos_classes) == [1025, 2051, 2064, 2078, 2209, 2339]
    assert list(tok.offsets + tok.eos_classes) == [1026, 2052, 2065, 2079, 2210, 2340]
    assert (tok.max_shift, tok.max_dur) == (1023, 1023)


def test_config_validation():
    with pytest.raises(UserError):
        CompoundConfig(long_gap="wrap")
    with pytest.raises(UserError):
        CompoundConfig.preset("7B")


# --- encode / decode round trip ---------------------------------------------------------------
def test_round_trip_midi(tmp_path, tok):
    rng = np.random.default_rng(0)
    piano = [(float(rng.uniform(0, 20)), float(rng.uniform(0.02, 3.0)), int(rng.integers(21, 109)),
              int(rng.integers(1, 128))) for _ in range(200)]
    bass = [(float(rng.uniform(0, 20)), 0.5, int(rng.integers(28, 50)), 90) for _ in range(30)]
    drums = [(0.25 * i, 0.1, 36 + i % 3, 100) for i in range(20)]
    score = write_score(tmp_path / "a.mid",
                        [(0, False, piano), (33, False, bass), (0, True, drums)],
                        tempos=((0, 120.0), (4000, 77.0)))
    rows = tok.encode(score)
    assert rows.dtype == np.int64 and rows.ndim == 2 and rows.shape[1] == 6
    assert rows[0].tolist() == SOS_ROW and rows[-1].tolist() == EOS_ROW
    ev = rows[1:-1]
    assert len(ev) == 250
    assert (np.diff(ev[:, 0]) >= 0).all()  # onset order
    assert set(ev[:, 4].tolist()) == {0, 33, 128}
    decoded = tok.decode(rows)
    assert tok.decode(tok.encode(decoded)).tracks[0].notes == decoded.tracks[0].notes
    want = {(p, d): a for p, d, a in notes_in_seconds(score)}
    got = {(p, d): a for p, d, a in notes_in_seconds(decoded)}
    assert set(want) == set(got) == {(0, False), (33, False), (0, True)}
    # Tracks in order of first appearance: the drums start at 0 s; drums get program 0.
    assert [(t.program, t.is_drum) for t in decoded.tracks][0] == (0, True)
    for key, a in want.items():
        b = got[key]
        assert a.shape == b.shape
        # Sort both by (rounded onset, pitch) so ties within a tick match up.
        a = a[np.lexsort((a[:, 2], np.rint(a[:, 0] * 100)))]
        b = b[np.lexsort((b[:, 2], np.rint(b[:, 0] * 100)))]
        assert np.abs(a[:, 0] - b[:, 0]).max() <= 0.01 + 1e-6
        assert np.abs(a[:, 1] - b[:, 1]).max() <= 0.01 + 1e-6
        assert (a[:, 2] == b[:, 2]).all() and (a[:, 3] == b[:, 3]).all()


def test_encode_values_and_ties(tmp_path, tok):
    # Two tracks with notes at one instant: ties keep track order, no pitch sort.
    score = write_score(tmp_path / "b.mid",
                        [(0, False, [(1.0, 0.004, 72, 5)]),
                         (40, False, [(1.0, 2.0, 40, 127), (0.5, 0.5, 127, 1)])])
    rows = tok.encode(score)
    assert rows[1:-1].tolist() == [
        [50, 50, 10, 7, 40, 1],
        [100, 1, 6, 0, 0, 5],  # 4 ms rounds to 0 ticks -> 1
        [100, 200, 3, 4, 40, 127],
    ]


def test_empty_score(tok):
    rows = tok.encode(symusic.Score(480))
    assert rows.tolist() == [SOS_ROW, EOS_ROW]
    assert len(tok.decode(rows).tracks) == 0


def test_long_gap_split_clamp_drop(tmp_path):
    notes = [(0.0, 0.5, 60, 80), (1.0, 60.0, 62, 81), (30.0, 0.5, 64, 82), (31.0, 0.5, 65, 83)]
    score = write_score(tmp_path / "c.mid", [(0, False, notes)])
    split = CompoundTokenizer(CompoundConfig.preset("309M"))  # max shift / duration 10.23 s
    rows, stats = split.encode_with_stats(score)
    assert stats == {"chunks": 2, "split_gaps": 1, "clamped_gaps": 0, "clamped_durations": 1,
                     "dropped": 0}
    assert rows.tolist() == [SOS_ROW, [0, 50, 5, 0, 0, 80], [100, 1023, 5, 2, 0, 81], EOS_ROW,
                             SOS_ROW, [0, 50, 5, 4, 0, 82], [100, 50, 5, 5, 0, 83], EOS_ROW]
    labels = split.to_labels(rows)
    assert (split.from_labels(labels) == rows).all()
    # Decoded, the second chunk follows the end of the first (tick 1123).
    notes_out = split.decode(rows).tracks[0].notes.numpy()
    assert notes_out["time"].tolist() == [0, 100, 1123, 1223]

    clamp = CompoundTokenizer(CompoundConfig.preset("309M", long_gap="clamp"))
    rows, stats = clamp.encode_with_stats(score)
    assert stats["clamped_gaps"] == 1 and stats["chunks"] == 1
    assert rows[1:-1, 0].tolist() == [0, 100, 1123, 1223]

    drop = CompoundTokenizer(CompoundConfig.preset("309M", long_gap="drop"))
    rows, stats = drop.encode_with_stats(score)
    assert rows.shape == (0, 6) and stats["dropped"] == 1


def test_long_leading_silence_is_cut(tmp_path):
    score = write_score(tmp_path / "d.mid",
                        [(0, False, [(20.0, 0.5, 60, 80), (21.0, 0.5, 61, 80)])])
    tok = CompoundTokenizer(CompoundConfig.preset("309M"))
    rows, stats = tok.encode_with_stats(score)
    assert rows[1:-1, 0].tolist() == [0, 100] and stats["split_gaps"] == 1
    # Within the limit, onsets stay absolute.
    rows = CompoundTokenizer().encode(score)
    assert rows[1:-1, 0].tolist() == [2000, 2100]


# --- labels -----------------------------------------------------------------------------------
def test_labels_follow_spec(tok):
    rows = np.array([SOS_ROW, [7, 3, 4, 0, 0, 64], [7, 5, 5, 11, 128, 127], [20, 1, 0, 0, 3, 1],
                     EOS_ROW, [-3] * 6])
    labels = tok.to_labels(rows)
    assert labels.shape == (6, 7)
    assert labels[0].tolist() == [0, 4098, 8197, 8210, 8224, 8355, 8485]
    assert labels[1].tolist() == [0, 1 + 7, 4100 + 3, 8199 + 4, 8212, 8226, 8357 + 64]
    assert labels[2].tolist() == [0, 1 + 0, 4100 + 5, 8199 + 5, 8212 + 11, 8226 + 128, 8357 + 127]
    assert labels[3, 1] == 1 + 13
    assert labels[4].tolist() == [0, 4099, 8198, 8211, 8225, 8356, 8486]
    assert labels[5].tolist() == [0] * 7
    assert (tok.from_labels(labels) == rows).all()
    assert (tok.from_labels(labels[:, 1:]) == rows).all()


def test_labels_inverse_random(tok):
    rng = np.random.default_rng(1)
    parts = []
    for _ in range(5):
        n = int(rng.integers(0, 30))
        onset = np.cumsum(rng.integers(0, tok.max_shift + 1, n))
        pitch = rng.integers(0, 128, n)
        ev = np.stack([onset, rng.integers(1, tok.max_dur + 1, n), pitch // 12, pitch % 12,
                       rng.integers(0, 129, n), rng.integers(1, 128, n)], 1)
        parts += [np.array([SOS_ROW]), ev.reshape(-1, 6), np.array([EOS_ROW])]
    rows = np.concatenate(parts).astype(np.int64)
    labels = tok.to_labels(rows)
    for col, r in enumerate(tok.id_ranges(), start=1):
        assert ((labels[:, col] >= r.start) & (labels[:, col] < r.stop)).all()
    assert (tok.from_labels(labels) == rows).all()
    assert (tok.to_labels(tok.from_labels(labels)) == labels).all()


def test_labels_reject_out_of_range(tok):
    with pytest.raises(ValueError):
        tok.to_labels(np.array([[10, 1, 5, 0, 0, 64], [5, 1, 5, 0, 0, 64]]))  # negative Δ
    with pytest.raises(ValueError):
        tok.to_labels(np.array([[0, 4097, 5, 0, 0, 64]]))  # duration past max_dur


# --- decode robustness ------------------------------------------------------------------------
def test_decode_garbage_never_raises(tok):
    rng = np.random.default_rng(2)
    inputs = [np.zeros((0, 6)), np.zeros(0), np.array(3), np.zeros((5, 7)), [[1, 2]], "abc", None,
              np.full((4, 6), np.nan), np.full((3, 6), 2**70, dtype=object), [[1.5] * 6],
              np.full((2, 6), 2**62, dtype=np.int64)]
    for _ in range(50):
        n = int(rng.integers(0, 200))
        inputs.append(rng.integers(-5, 9000, (n, 6)))
        inputs.append(rng.integers(-(2**40), 2**40, (n, 6)))
    for x in inputs:
        score = tok.decode(x)
        assert isinstance(score, symusic.Score)
        for track in score.tracks:
            n = track.notes.numpy()
            assert (n["duration"] >= 1).all() and (n["time"] >= 0).all()
            assert ((n["pitch"] >= 0) & (n["velocity"] >= 1)).all()


def test_decode_stops_at_eos_class_until_next_sos(tok):
    rows = np.array([[0, 10, 5, 0, 0, 64], [10, 10, 5, 2, 0, 64], [20, 4098, 5, 4, 0, 64],
                     [30, 10, 5, 5, 0, 64], SOS_ROW, [0, 10, 6, 0, 0, 64]])
    notes = tok.decode(rows).tracks[0].notes.numpy()
    assert notes["pitch"].tolist() == [60, 62, 72]
    assert notes["time"].tolist() == [0, 10, 20]


# --- registry and serialisation ---------------------------------------------------------------
def test_build_save_load(tmp_path):
    tok = build_tokenizer("moonbeam", {"onset_vocab_size": 1026, "dur_vocab_size": 1026,
                                       "long_gap": "clamp"})
    assert isinstance(tok, CompoundTokenizer) and tok.vocab_size == 2341
    tok.save(tmp_path / "tok.json")
    back = load_tokenizer(tmp_path / "tok.json")
    assert back == tok and isinstance(back, CompoundTokenizer)
    assert back.config_hash() == tok.config_hash() != CompoundTokenizer().config_hash()


def test_pedal_ignored_by_default_folded_on_request(tmp_path):
    score = symusic.Score(480)
    score.tempos.append(symusic.Tempo(0, 120.0))  # 960 ticks per second
    track = symusic.Track(name="p", program=0)
    track.notes.append(symusic.Note(0, 480, 60, 70))  # 0.5 s
    track.controls.append(symusic.ControlChange(240, 64, 127))
    track.controls.append(symusic.ControlChange(1920, 64, 0))  # released at 2 s
    score.tracks.append(track)
    assert CompoundTokenizer().encode(score)[1].tolist() == [0, 50, 5, 0, 0, 70]
    folded = CompoundTokenizer(CompoundConfig(fold_pedal=True)).encode(score)
    assert folded[1].tolist() == [0, 200, 5, 0, 0, 70]


def test_empty_labels(tok):
    assert tok.to_labels(np.zeros((0, 6), np.int64)).shape == (0, 7)
    assert tok.from_labels(np.zeros((0, 7), np.int64)).shape == (0, 6)


def test_a_piece_split_at_a_long_silence_is_reported(tmp_path, capsys) -> None:
    from conftest import write_midi

    from mehldau.data.corpus import build_corpus
    from mehldau.data.sources import folder_source

    tok = CompoundTokenizer(CompoundConfig(onset_vocab_size=1026, dur_vocab_size=1026))  # 309M
    notes = [(60 + i, 0.5 * i, 0.4, 80) for i in range(6)]
    write_midi(tmp_path / "data" / "gap.mid", notes + [(64, 20.0 + i, 0.5, 80) for i in range(3)])
    write_midi(tmp_path / "data" / "plain.mid", notes)
    corpus = build_corpus(folder_source(tmp_path / "data", group_by="file",
                                        ratios=(1.0, 0.0, 0.0)), tok, tmp_path / "run", None)
    err = capsys.readouterr().err
    assert "skipped 0; 1 kept but changed, e.g. split at 1 silence(s) longer than 10.23 s into 2" \
        in err
    rows = (tmp_path / "run" / "changed.tsv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].endswith("into 2 samples") and "gap.mid" in rows[1]
    assert sum(len(s) for s in corpus.sequences("train")) == (9 + 2 * 2) + (6 + 2)  # SOS, EOS
