"""Performance-event tokenizer: round trips through real MIDI files, pedal, decoding garbage."""

from __future__ import annotations

import numpy as np
import pretty_midi
import pytest
import symusic

from mehldau.tokenize.base import build_tokenizer, load_tokenizer
from mehldau.tokenize.performance import PerformanceConfig, PerformanceTokenizer

STEP = 0.01  # seconds per step with the default config


@pytest.fixture
def tok() -> PerformanceTokenizer:
    return PerformanceTokenizer()


def make_score(notes, tpq=500, qpm=120.0, drums=(), controls=(), program=0) -> symusic.Score:
    """notes: (onset_tick, duration_tick, pitch, velocity) tuples, one piano track."""
    score = symusic.Score(tpq)
    score.tempos.append(symusic.Tempo(0, qpm))
    track = symusic.Track(name="Piano", program=program, is_drum=False)
    for t, d, p, v in notes:
        track.notes.append(symusic.Note(int(t), int(d), int(p), int(v)))
    for t, v in controls:
        track.controls.append(symusic.ControlChange(int(t), 64, int(v)))
    score.tracks.append(track)
    if drums:
        drum = symusic.Track(name="Drums", program=0, is_drum=True)
        for t, d, p, v in drums:
            drum.notes.append(symusic.Note(int(t), int(d), int(p), int(v)))
        score.tracks.append(drum)
    return score


def decoded_notes(tok: PerformanceTokenizer, ids: np.ndarray) -> np.ndarray:
    """ids -> (N, 4) array of onset step, offset step, pitch, velocity, sorted by pitch, onset."""
    n = tok.decode(ids).tracks[0].notes.numpy()
    s = n["time"].astype(np.int64) // tok.ticks_per_step
    e = (n["time"] + n["duration"]).astype(np.int64) // tok.ticks_per_step
    out = np.stack([s, e, n["pitch"].astype(np.int64), n["velocity"].astype(np.int64)], 1)
    return out[np.lexsort((out[:, 0], out[:, 2]))]


def random_chains(rng, num_pitches=40, per_pitch=8):
    """Notes in seconds with no overlap within a pitch, incl. a few gaps of several seconds."""
    notes = []
    for pitch in rng.choice(np.arange(21, 109), num_pitches, replace=False):
        t = rng.uniform(0, 2)
        for _ in range(per_pitch):
            dur = rng.uniform(0.03, 1.5)
            notes.append((t, t + dur, int(pitch), int(rng.integers(1, 128))))
            t += dur + rng.uniform(0.05, 4.0 if rng.random() < 0.1 else 0.6)
    return notes


# --- vocabulary and id helpers ---------------------------------------------------------------
def test_vocabulary_layout(tok):
    assert tok.vocab_size == 311
    assert tok.special_tokens == {"pad": 0, "bos": 1, "eos": 2}
    assert tok.event_shape == ()
    assert (tok.note_on_id(21), tok.note_on_id(108)) == (3, 90)
    assert (tok.note_off_id(21), tok.note_off_id(108)) == (91, 178)
    assert (tok.time_shift_id(1), tok.time_shift_id(100)) == (179, 278)
    assert (tok.velocity_id(0), tok.velocity_id(31)) == (279, 310)
    assert list(tok.note_on_range) + list(tok.note_off_range) + list(tok.time_shift_range) \
        + list(tok.velocity_range) == list(range(3, 311))
    assert tok.id_to_event(tok.time_shift_id(25)) == ("time_shift", 25)
    assert tok.id_to_event(tok.note_off_id(60)) == ("note_off", 60)
    with pytest.raises(ValueError):
        tok.note_on_id(20)
    # decode lands in the bin it came from
    v = np.arange(1, 128)
    assert (tok.velocity_to_bin(tok.bin_to_velocity(tok.velocity_to_bin(v))) ==
            tok.velocity_to_bin(v)).all()
    assert tok.decode_tpq == 500 and tok.ticks_per_step == 10


def test_build_save_load(tmp_path):
    tok = build_tokenizer("performance", {})
    assert isinstance(tok, PerformanceTokenizer) and tok == PerformanceTokenizer()
    tok.save(tmp_path / "tok.json")
    loaded = load_tokenizer(tmp_path / "tok.json")
    assert loaded == tok and loaded.config_hash() == tok.config_hash()

    other = PerformanceTokenizer(PerformanceConfig(num_velocity_bins=16, shared_pedal=False))
    other.save(tmp_path / "other.json")
    loaded = load_tokenizer(tmp_path / "other.json")
    assert loaded == other and loaded.config_hash() == other.config_hash()
    assert other.config_hash() != tok.config_hash() and other.vocab_size == 311 - 16


# --- round trip through a MIDI file -------------------------------------------------------------
def test_round_trip_midi_file(tok, tmp_path):
    rng = np.random.default_rng(0)
    notes = random_chains(rng)
    # 97 BPM, then 143 BPM from bar 3; the chain times (x 600) become ticks.
    score = symusic.Score(384)
    score.tempos.extend([symusic.Tempo(0, 97.0), symusic.Tempo(384 * 8, 143.0)])
    track = symusic.Track(name="Piano", program=0)
    for s, e, p, v in notes:
        track.notes.append(symusic.Note(round(s * 600), round(e * 600) - round(s * 600), p, v))
    score.tracks.append(track)
    path = tmp_path / "in.mid"
    score.dump_midi(str(path))

    score = symusic.Score(str(path))
    assert len(score.tempos) == 2
    truth = pretty_midi.PrettyMIDI(str(path)).instruments[0].notes  # seconds, read back
    ids = tok.encode(score)
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert ids.min() >= 3 and ids.max() < tok.vocab_size

    out = tmp_path / "out.mid"
    tok.decode_to_file(ids, out)
    got = pretty_midi.PrettyMIDI(str(out)).instruments[0].notes
    assert len(got) == len(truth) == len(notes)
    truth = sorted(truth, key=lambda n: (n.pitch, n.start))
    got = sorted(got, key=lambda n: (n.pitch, n.start))
    tol = STEP / 2 + 1e-3  # rounding to the 10 ms grid, plus float error
    assert [n.pitch for n in got] == [n.pitch for n in truth]
    assert max(abs(a.start - b.start) for a, b in zip(got, truth)) <= tol
    assert max(abs(a.end - b.end) for a, b in zip(got, truth)) <= tol
    v_got = np.array([n.velocity for n in got])
    v_true = np.array([n.velocity for n in truth])
    assert (tok.velocity_to_bin(v_got) == tok.velocity_to_bin(v_true)).all()
    assert np.abs(v_got - v_true).max() < tok.velocity_bin_size
    # and the decoded file encodes to the same tokens
    assert np.array_equal(tok.encode(symusic.Score(str(out))), ids)


def test_event_order_and_velocity_events(tok):
    # 1 tick = 1 ms. Two notes at 0 with one velocity bin, re-strike of 60 at 100 ms.
    score = make_score([(0, 100, 60, 81), (0, 50, 64, 82), (100, 100, 60, 20)])
    ids = tok.encode(score)
    v80, v20 = tok.velocity_to_bin(81), tok.velocity_to_bin(20)
    assert v80 == tok.velocity_to_bin(82)
    assert ids.tolist() == [
        tok.velocity_id(v80), tok.note_on_id(60), tok.note_on_id(64),
        tok.time_shift_id(5), tok.note_off_id(64),
        tok.time_shift_id(5), tok.note_off_id(60), tok.velocity_id(v20), tok.note_on_id(60),
        tok.time_shift_id(10), tok.note_off_id(60),
    ]


def test_long_gaps_use_several_time_shifts(tok):
    score = make_score([(0, 100, 60, 64), (3650, 100, 62, 64)])  # 3.55 s of silence
    ids = tok.encode(score)
    ts = tok.time_shift_id
    assert ids[3:9].tolist() == [tok.note_off_id(60), ts(100), ts(100), ts(100), ts(55),
                                tok.note_on_id(62)]
    # a leading silence is kept too
    ids = tok.encode(make_score([(1234, 100, 60, 64)]))
    assert ids[:2].tolist() == [ts(100), ts(23)]


def test_quantisation_short_and_overlapping_notes(tok):
    notes = [(0, 2, 60, 64),  # 2 ms: one step
             (1000, 500, 62, 64), (1200, 500, 62, 64),  # overlap: first ends at 1.2 s
             (2000, 300, 64, 64), (2000, 100, 64, 64)]  # same onset: the longer one stays
    got = decoded_notes(tok, tok.encode(make_score(notes)))
    assert got[:, :3].tolist() == [[0, 1, 60], [100, 120, 62], [120, 170, 62], [200, 230, 64]]


def test_out_of_range_pitches_dropped(tok):
    notes = [(0, 100, p, 64) for p in (0, 20, 21, 60, 108, 109, 127)]
    got = decoded_notes(tok, tok.encode(make_score(notes)))
    assert got[:, 2].tolist() == [21, 60, 108]


def test_drum_tracks_ignored(tok):
    notes = [(0, 100, 60, 64), (500, 100, 62, 90)]
    drums = [(0, 50, 36, 100), (250, 50, 38, 100), (700, 50, 42, 100)]
    assert np.array_equal(tok.encode(make_score(notes, drums=drums)),
                          tok.encode(make_score(notes)))
    score = make_score([], drums=drums)
    assert tok.encode(score).shape == (0,)
    assert tok.encode(symusic.Score(480)).shape == (0,)


# --- sustain pedal ------------------------------------------------------------------------------
def pedal_score(tpq=480):
    # 120 BPM, tpq 480: 960 ticks per second; times below are in seconds.
    def sec(x):
        return round(x * 960)

    notes = [
        (0.1, 0.2, 65),  # released before the pedal goes down: unchanged
        (0.0, 0.5, 60),  # released under the pedal: ends at the release, 1.5 s
        (0.3, 0.6, 62),  # held by the pedal, but struck again at 1.0: ends at 1.0
        (1.0, 1.1, 62),  # released under the pedal: ends at 1.5
        (1.6, 1.8, 64),  # pedal up: unchanged
        (2.1, 2.2, 67),  # pedal pressed at 2.0 and never released: ends at the piece end, 3.0
        (2.5, 3.0, 69),
    ]
    notes = [(sec(s), sec(e) - sec(s), p, 80) for s, e, p in notes]
    # 64 counts as down, 63 as up; a second "down" value while down changes nothing.
    controls = [(sec(0.25), 64), (sec(0.8), 127), (sec(1.5), 63), (sec(2.0), 100)]
    return make_score(notes, tpq=tpq, controls=controls)


EXPECTED_PEDAL = [[10, 20, 65], [0, 150, 60], [30, 100, 62], [100, 150, 62], [160, 180, 64],
                  [210, 300, 67], [250, 300, 69]]


def test_pedal_folded_into_durations(tok):
    ids = tok.encode(pedal_score())
    got = decoded_notes(tok, ids)
    expected = sorted(EXPECTED_PEDAL, key=lambda n: (n[2], n[0]))
    assert got[:, :3].tolist() == expected
    kinds = {tok.id_to_event(i)[0] for i in ids}
    assert kinds <= {"note_on", "note_off", "time_shift", "velocity"}


def test_pedal_only_track_sustains_piano_tracks(tmp_path):
    """Files that put the hands on their own channels and the pedal on a third."""
    def sec(x):
        return round(x * 960)

    score = symusic.Score(480)
    score.tempos.append(symusic.Tempo(0, 120.0))
    pedal = symusic.Track(name="pedal", program=0)
    pedal.notes.append(symusic.Note(sec(3.0), sec(0.1), 30, 10))
    for t, v in [(0.2, 127), (1.0, 0), (1.2, 127), (2.0, 0)]:
        pedal.controls.append(symusic.ControlChange(sec(t), 64, v))
    right, left = symusic.Track(name="rh", program=0), symusic.Track(name="lh", program=4)
    right.notes.append(symusic.Note(sec(0.0), sec(0.5), 72, 80))
    left.notes.append(symusic.Note(sec(1.3), sec(0.2), 48, 80))
    bass = symusic.Track(name="bass", program=32)
    bass.notes.append(symusic.Note(sec(0.1), sec(0.4), 40, 80))
    score.tracks.extend([pedal, right, left, bass])

    tok = PerformanceTokenizer()
    got = {n[2]: n[:2] for n in decoded_notes(tok, tok.encode(score)).tolist()}
    # The bass track (program 32) is left out: piano-family tracks exist (piano_only).
    assert got == {30: [300, 310], 72: [0, 100], 48: [130, 200]}
    plain = PerformanceTokenizer(PerformanceConfig(shared_pedal=False, piano_only=False))
    got = {n[2]: n[:2] for n in decoded_notes(plain, plain.encode(score)).tolist()}
    assert got == {30: [300, 310], 72: [0, 50], 48: [130, 150], 40: [10, 50]}


# --- decoding anything --------------------------------------------------------------------
def test_decode_never_raises(tok, tmp_path):
    rng = np.random.default_rng(1)
    arrays = [np.zeros(0, np.int64), np.array([1, 2, 0]), np.array([-1, 311, 10**12, -(10**12)])]
    for i in range(197):
        n = int(rng.integers(0, 400))
        a = rng.integers(-50, 400, n) if i % 3 else rng.integers(3, 311, n)
        arrays.append(a.astype([np.int64, np.int32, np.int16][i % 3]))
    for a in arrays:
        score = tok.decode(a)
        assert score.tpq == 500 and len(score.tracks) == 1 and score.tracks[0].program == 0
        notes = score.tracks[0].notes.numpy()
        assert (notes["duration"] >= tok.ticks_per_step).all()
        assert ((notes["pitch"] >= 21) & (notes["pitch"] <= 108)).all()
        path = tmp_path / "garbage.mid"
        score.dump_midi(str(path))
        pm = pretty_midi.PrettyMIDI(str(path))
        assert sum(len(inst.notes) for inst in pm.instruments) == len(notes["pitch"])
    # odd inputs: floats, NaN, 2-D, a list
    tok.decode(np.array([[3.0, np.nan], [np.inf, 200.0]]))
    tok.decode([tok.note_on_id(60), tok.time_shift_id(10)])


def test_decode_pairing_rules(tok):
    on, off, ts, vel = tok.note_on_id, tok.note_off_id, tok.time_shift_id, tok.velocity_id
    ids = np.array([
        off(50),  # note-off without note-on: ignored
        1, vel(10), on(60), ts(20),
        on(60),  # re-strike without note-off: closes the first note at 0.2 s
        ts(10), off(60), off(60),  # second note-off ignored
        on(62), on(62),  # two note-ons at one instant: one note
        ts(5), 0, 400, -3,  # special and invalid ids skipped
        on(64),  # still sounding at the end: closed at the final time, but one step at least
        2,
    ])
    got = decoded_notes(tok, ids)
    assert got[:, :3].tolist() == [[0, 20, 60], [20, 30, 60], [30, 35, 62], [35, 36, 64]]
    assert (got[:, 3] == tok.bin_to_velocity(10)).all()
    # no velocity event at all: a fixed default
    assert decoded_notes(tok, np.array([on(60), ts(3), off(60)]))[:, 3].tolist() == [64]


# --- augmentation -------------------------------------------------------------------------------
def ms_score(notes, transpose=0, stretch=1.0):
    """notes in seconds -> score with 1 ms ticks, transposed and stretched; pitches outside the
    piano range stay in the score for the encoder to drop (only MIDI's 0..127 is enforced)."""
    return make_score([(round(s * stretch * 1000), round((e - s) * stretch * 1000),
                        p + transpose, v) for s, e, p, v in notes if 0 <= p + transpose <= 127])


def test_augment_transpose_equals_encoding_transposed(tok):
    rng = np.random.default_rng(2)
    notes = random_chains(rng, num_pitches=60)
    notes += [(0.0, 0.3, 106, 20), (0.0, 0.3, 107, 120), (0.5, 0.6, 60, 120)]  # edge case
    ids = tok.encode(ms_score(notes))
    for t in (-5, -3, -1, 1, 2, 3, 5):
        assert np.array_equal(tok.augment(ids, transpose=t), tok.encode(ms_score(notes, t))), t
    assert tok.augment(ids) is ids


def test_augment_stretch_matches_encoding_stretched(tok):
    rng = np.random.default_rng(3)
    notes = random_chains(rng)
    ids = tok.encode(ms_score(notes))
    for t, s in [(0, 0.95), (0, 1.05), (2, 0.975), (-3, 1.025), (0, 0.5), (0, 2.0)]:
        got = decoded_notes(tok, tok.augment(ids, transpose=t, stretch=s))
        want = decoded_notes(tok, tok.encode(ms_score(notes, t, s)))
        assert got.shape == want.shape
        assert np.array_equal(got[:, 2:], want[:, 2:])
        assert np.abs(got[:, :2] - want[:, :2]).max() <= 1  # steps


def test_augment_keeps_one_step_notes_and_order(tok):
    # 10 ms notes one step apart collapse under a strong squeeze; notes must stay >= 1 step.
    notes = [(i * 0.01, i * 0.01 + 0.01, 60 + (i % 2), 64) for i in range(20)]
    ids = tok.encode(ms_score(notes))
    out = tok.augment(ids, stretch=0.5)
    got = decoded_notes(tok, out)
    assert len(got) == 20 and (got[:, 1] > got[:, 0]).all()
    assert np.array_equal(tok.encode(tok.decode(out)), out)  # canonical order


def test_augment_crops_and_specials(tok):
    rng = np.random.default_rng(4)
    ids = tok.encode(ms_score([(s, e, min(max(p, 30), 100), v)
                               for s, e, p, v in random_chains(rng)]))
    crop = ids[137:1137]
    back = tok.augment(tok.augment(crop, transpose=3), transpose=-3)
    assert np.array_equal(back, crop)  # orphan note-offs and open notes survive
    wrapped = np.concatenate([[1], ids, [2]])
    out = tok.augment(wrapped, transpose=1, stretch=1.05)
    assert out[0] == 1 and out[-1] == 2 and ((out[1:-1] >= 3) & (out[1:-1] < 311)).all()
    with pytest.raises(ValueError):
        tok.augment(ids, stretch=0.0)


def test_saving_a_tokenizer_does_not_need_miditok(tmp_path, monkeypatch) -> None:
    import importlib.metadata as md

    from mehldau.tokenize.base import load_tokenizer

    real = md.version

    def version(name: str) -> str:
        if name == "miditok":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "version", version)
    tok = PerformanceTokenizer()
    tok.save(tmp_path / "tokenizer.json")
    assert "miditok" not in tok.to_dict()["versions"]
    assert load_tokenizer(tmp_path / "tokenizer.json") == tok


def test_the_note_stream_gives_a_note_on_note_off_note_once_the_clock_has_passed_its_end(
) -> None:
    """A note still sounding is closed at the current time by `decode`: not final, so the
    stream holds it back until its note-off is behind the clock, then gives it once."""
    from mehldau.generation import NoteStream

    tok = PerformanceTokenizer()
    stream = NoteStream(tok, np.array([[tok.time_shift_id(10)]]))  # a prompt of 0.1 s
    got = []
    ids = [tok.velocity_id(20), tok.note_on_id(60), tok.time_shift_id(50), tok.note_on_id(64),
           tok.note_off_id(60), tok.time_shift_id(25), tok.note_off_id(64),
           tok.time_shift_id(5)]
    for i in ids:
        got.append([(round(n.start, 2), round(n.end, 2), n.pitch) for n in stream.push([i])])
    assert got == [[], [], [], [], [], [(0.1, 0.6, 60)], [], [(0.6, 0.85, 64)]]
