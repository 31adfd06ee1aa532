"""Duration tokenizer: exact round trips on the grid, crops that leave no note open, the grammar
the sampler keeps, augmentation, and garbage that still decodes."""

from __future__ import annotations

import numpy as np
import pytest
import symusic
import torch

from mehldau.data.dataset import Augmentation, RandomCropDataset, WindowDataset, add_bos_eos
from mehldau.errors import UserError
from mehldau.sampling import SamplingConfig, sample_tokens
from mehldau.tokenize.base import build_tokenizer, load_tokenizer
from mehldau.tokenize.duration import DurationConfig, DurationTokenizer


@pytest.fixture(scope="module")
def tok() -> DurationTokenizer:
    return DurationTokenizer()


def score_of(notes, tpq=480, qpm=120.0, pedals=()) -> symusic.Score:
    """notes: (start_s, end_s, pitch, velocity); pedals: (down_s, up_s)."""
    tick = tpq * qpm / 60.0
    score = symusic.Score(tpq)
    score.tempos.append(symusic.Tempo(0, qpm))
    track = symusic.Track(name="Piano", program=0)
    for s, e, p, v in notes:
        track.notes.append(symusic.Note(round(s * tick), max(round((e - s) * tick), 1), p, v))
    for d, u in pedals:
        track.controls.append(symusic.ControlChange(round(d * tick), 64, 127))
        track.controls.append(symusic.ControlChange(round(u * tick), 64, 0))
    score.tracks.append(track)
    return score


def steps(notes_s: list, tpq=480, qpm=120.0) -> np.ndarray:
    """(start_s, end_s, pitch, velocity) -> (start, duration, pitch, velocity) in 10 ms steps,
    through the MIDI ticks `score_of` writes and the tokenizer's rounding."""
    tick = tpq * qpm / 60.0
    rows = []
    for s, e, p, v in notes_s:
        a, d = round(s * tick), max(round((e - s) * tick), 1)
        start, end = np.floor(a / tick * 100 + 0.5), np.floor((a + d) / tick * 100 + 0.5)
        rows.append((start, max(end - start, 1), p, v))
    a = np.array(rows, np.int64)
    return a[np.lexsort((a[:, 2], a[:, 0]))]


def decoded(tok: DurationTokenizer, ids: np.ndarray, offset: int = 0) -> np.ndarray:
    """ids -> (N, 4) start step (+ offset), duration steps, pitch, velocity; by onset, pitch."""
    n = tok.decode(ids).tracks[0].notes.numpy()
    tps = tok._perf.ticks_per_step
    a = np.stack([n["time"] // tps + offset, n["duration"] // tps, n["pitch"], n["velocity"]],
                 1).astype(np.int64)
    return a[np.lexsort((a[:, 2], a[:, 0]))]


def chains(rng: np.random.Generator, n_pitches: int = 30, per_pitch: int = 8) -> list:
    """Notes up to 7 s long, apart within a pitch by more than half a grid step; times 2 ms
    past a 10 ms step, so no rounding is a tie."""
    out = []
    for pitch in rng.choice(np.arange(21, 109), n_pitches, replace=False):
        t = round(float(rng.uniform(0, 2)), 2)
        for _ in range(per_pitch):
            d = float(rng.choice([rng.uniform(0.02, 1.0), rng.uniform(1.0, 7.0)], p=[0.8, 0.2]))
            d = round(d, 2)
            out.append((t + 0.002, t + d + 0.002, int(pitch), int(rng.integers(1, 128))))
            t = round(t + d + float(rng.uniform(0.1, 1.5)), 2)
    return out


# --- vocabulary ------------------------------------------------------------------------------
def test_layout_and_grid(tok):
    assert len(tok.durations) == 230 and tok.durations[0] == 1 and tok.durations[-1] == 800
    assert (np.diff(tok.durations) > 0).all()
    assert tok.vocab_size == 3 + 88 + 230 + 100 + 32
    ranges = [tok.note_range, tok.duration_range, tok.time_shift_range, tok.velocity_range]
    assert [r.start for r in ranges[1:]] == [r.stop for r in ranges[:-1]]
    assert tok.duration_index([1, 100, 101, 102, 103, 799, 800, 5000]).tolist() == \
        [0, 99, 99, 100, 100, 229, 229, 229]  # ties go to the shorter value
    assert tok.seconds_per_id()[tok.time_shift_range.start + 24] == pytest.approx(0.25)


@pytest.mark.parametrize("grid", [[[100, 3]], [[100, 1], [50, 1]], [], [[100]]])
def test_bad_grid_is_one_line_user_error(grid):
    with pytest.raises(UserError, match="duration_grid"):
        DurationConfig(duration_grid=grid)


def test_saved_and_loaded(tok, tmp_path):
    tok2 = build_tokenizer("duration", {"duration_grid": [[50, 1], [300, 10]]})
    tok2.save(tmp_path / "t.json")
    back = load_tokenizer(tmp_path / "t.json")
    assert back == tok2 and back != tok and len(back.durations) == 75


# --- round trips -----------------------------------------------------------------------------
def test_round_trip_exact_to_the_grid(tok):
    notes = chains(np.random.default_rng(0))
    want = steps(notes)
    got = decoded(tok, tok.encode(score_of(notes)))
    assert len(got) == len(want)
    assert (got[:, 0] == want[:, 0]).all() and (got[:, 2] == want[:, 2]).all()
    # Every duration is the grid value nearest the played one: within half its bin.
    assert (got[:, 1] == tok.durations[tok.duration_index(want[:, 1])]).all()
    assert (tok._perf.velocity_to_bin(got[:, 3]) == tok._perf.velocity_to_bin(want[:, 3])).all()
    assert (np.abs(got[:, 1] - want[:, 1]) <= np.maximum(want[:, 1] // 40, 0) + 5).all()


def test_pedal_is_folded_and_long_notes_are_counted(tok):
    notes = [(0.0, 0.2, 60, 80), (0.5, 0.6, 64, 80), (1.0, 11.0, 40, 70)]
    ids = tok.encode(score_of(notes, pedals=[(0.1, 1.5)]))
    got = decoded(tok, ids)
    assert got[:, 1].tolist() == [150, 100, 800]  # held by the pedal to 1.5 s; 10 s -> 8 s
    assert tok.encode_note(ids) == "1 note(s) of 8 s or longer shortened to it"
    assert tok.encode_note(tok.encode(score_of(notes[:2]))) is None


def test_crops_and_windows_leave_no_note_open(tok):
    """Sustained chords under a running line, cut into windows of token ids: each window
    decodes on its own to exactly the notes whose NOTE and DURATION lie in it, each
    with its whole grid duration, including the notes that sound past the window's end."""
    rng = np.random.default_rng(1)
    chords = [(48, 52, 55), (50, 53, 57)]
    notes = [(t + 0.002, t + 3.002, p, 60) for i, t in enumerate(np.arange(0, 20, 2.0))
             for p in chords[i % 2]]
    notes += [(round(t, 2) + 0.002, round(t, 2) + 0.122, int(rng.integers(64, 90)), 90)
              for t in np.arange(0.05, 21, 0.17)]
    seq = tok.encode(score_of(notes))
    want = steps(notes)  # in encoding order: by onset, then pitch
    want[:, 1] = tok.durations[tok.duration_index(want[:, 1])]
    note_pos = np.flatnonzero(np.isin(seq, tok.note_range))
    assert len(note_pos) == len(want)
    clock = np.concatenate([[0], np.cumsum(tok.seconds_per_id()[seq] * 100)]).round()
    crossing = 0
    for a in range(0, len(seq), 50):
        b = min(a + 50, len(seq))
        inside = (note_pos >= a) & (note_pos + 1 < b)  # NOTE and DURATION in the window
        got = decoded(tok, seq[a:b], offset=int(clock[a]))
        expect = want[inside]
        expect = expect[np.lexsort((expect[:, 2], expect[:, 0]))]
        assert (got[:, :3] == expect[:, :3]).all()
        crossing += int((expect[:, 0] + expect[:, 1] > clock[b]).sum())
    assert crossing > 20  # many notes ring past the end of their window, durations intact
    # Training crops decode the same way: every note has a duration of the grid. A short
    # piece beside the long one makes some crops padded.
    short = tok.encode(score_of(notes[:6]))
    ds = RandomCropDataset([add_bos_eos(seq, tok), add_bos_eos(short, tok)], 48, tok, seed=3,
                           augment=Augmentation(2, (0.95, 1.05)))
    padded = 0
    for i in range(40):
        ids = ds[i]["input_ids"].numpy()
        assert np.isin(decoded(tok, ids)[:, 1], tok.durations).all()
        padded += check_crop_grammar(tok, ids) < len(ids)
    assert 0 < padded < 40
    assert len(WindowDataset([add_bos_eos(seq, tok)], 48, 0)) > 1


def check_crop_grammar(tok: DurationTokenizer, ids: np.ndarray) -> int:
    """A training crop is real tokens, then PAD only: PAD never inside, and the grammar holds
    between every two real tokens (padded crops included). Returns the real length."""
    pad = tok.special_tokens["pad"]
    is_pad = ids == pad
    n = int(np.argmax(is_pad)) if is_pad.any() else len(ids)
    assert is_pad[n:].all(), f"PAD inside the crop at {n}, followed by real tokens"
    real = ids[:n]
    bad = np.flatnonzero(~tok.next_token_mask()[real[:-1], real[1:]])
    assert not len(bad), f"grammar broken after position {bad[0]}: {real[bad[0]:bad[0] + 2]}"
    return n


def test_the_crop_grammar_check_catches_broken_crops(tok):
    seq = add_bos_eos(tok.encode(score_of([(0.1 * k, 0.1 * k + 0.5, 60 + k, 80)
                                           for k in range(8)])), tok)
    pad = tok.special_tokens["pad"]
    crop = np.concatenate([seq[:17], np.full(7, pad)])
    assert check_crop_grammar(tok, crop) == 17
    note = int(np.flatnonzero(np.isin(crop, tok.note_range))[2])
    broken = {
        "a NOTE dropped mid-triple": np.concatenate([np.delete(crop, note), [pad]]),
        "PAD in the middle": np.where(np.arange(len(crop)) == 9, pad, crop),
        "a DURATION twice": np.concatenate([crop[: note + 2], crop[note + 1 :]])[: len(crop)],
    }
    for what, ids in broken.items():
        with pytest.raises(AssertionError):
            check_crop_grammar(tok, ids)
        # The check this replaces let every padded crop through:
        assert ids[-1] == pad, what


def test_windows_not_cut_by_whole_triples_drop_only_the_cut_note(tok):
    seq = tok.encode(score_of([(0.0, 1.0, 60, 80), (0.5, 2.0, 62, 80), (1.0, 1.5, 64, 80)]))
    # [V N D] [S V N D] [S V N D]: cut after the second NOTE.
    assert len(decoded(tok, seq[:6])) == 1 and len(decoded(tok, seq[7:])) == 1
    assert len(decoded(tok, seq)) == 3


# --- augmentation ----------------------------------------------------------------------------
def test_augment_equals_encoding_the_transformed_piece(tok):
    notes = chains(np.random.default_rng(2), n_pitches=12, per_pitch=5)
    seq = tok.encode(score_of(notes))
    moved = tok.augment(seq, transpose=2, stretch=1.0)
    assert (moved == tok.encode(score_of([(s, e, p + 2, v) for s, e, p, v in notes]))).all()
    stretched = decoded(tok, tok.augment(seq, stretch=1.05))
    plain = decoded(tok, seq)
    assert len(stretched) == len(plain)
    assert np.abs(stretched[:, 0] - np.floor(plain[:, 0] * 1.05 + 0.5)).max() == 0
    want = tok.durations[tok.duration_index(np.floor(plain[:, 1] * 1.05 + 0.5))]
    order = np.lexsort((plain[:, 2], np.floor(plain[:, 0] * 1.05 + 0.5)))
    assert (stretched[:, 1] == want[order]).all()


def test_augment_drops_notes_pushed_off_the_keyboard_and_keeps_bos_eos(tok):
    seq = add_bos_eos(tok.encode(score_of([(0, 1, 107, 80), (0, 1, 60, 80)])), tok)
    out = tok.augment(seq, transpose=3)
    assert out[0] == 1 and out[-1] == 2
    assert decoded(tok, out)[:, 2].tolist() == [63]


# --- grammar and decoding garbage ------------------------------------------------------------
def test_encoded_sequences_follow_the_grammar(tok):
    mask = tok.next_token_mask()
    seq = add_bos_eos(tok.encode(score_of(chains(np.random.default_rng(3)))), tok)
    assert mask[seq[:-1], seq[1:]].all()
    assert not mask[tok.velocity_range.start, tok.time_shift_range.start]
    assert not mask[tok.time_shift_range.start, tok.duration_range.start]
    assert mask[tok.note_range.start].sum() == len(tok.durations)


class _RandomDecoder:
    """Logits that favour the grammar-breaking ids, so the mask is what keeps order."""

    def __init__(self, tok: DurationTokenizer, seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.bias = torch.zeros(tok.vocab_size)
        self.bias[tok.duration_range.start:tok.duration_range.stop] = 3.0
        self.bias[tok.note_range.start:tok.note_range.stop] = 3.0
        self.B = 0

    def prefill(self, ids):
        self.B = ids.size(0)
        return self.step(None)

    def step(self, token):
        return torch.randn(self.B, len(self.bias), generator=self.g) + self.bias


def test_sampling_under_the_mask_gives_only_whole_notes(tok):
    mask = torch.as_tensor(tok.next_token_mask())
    prompt = torch.full((3, 1), 1)
    out = sample_tokens(_RandomDecoder(tok), prompt, 300, SamplingConfig(),
                        generator=torch.Generator().manual_seed(0), banned_ids=(0, 1, 2),
                        allowed_next=mask)
    for row in out.numpy():
        assert mask[row[:-1], row[1:]].all()
        is_note = np.isin(row, tok.note_range)
        n_notes = int(is_note[:-1].sum())
        assert n_notes > 10 and len(decoded(tok, row)) >= n_notes - 1  # at most the last one
    free = sample_tokens(_RandomDecoder(tok), prompt, 300, SamplingConfig(),
                         generator=torch.Generator().manual_seed(0), banned_ids=(0, 1, 2))
    row = free[0].numpy()
    assert not mask[row[:-1], row[1:]].all()  # without the mask this decoder breaks notes


@pytest.mark.parametrize("garbage", [np.array([]), np.array([5, 5, 5]), np.arange(-5, 600),
                                     np.array([np.nan, 1e30, 7.0]), np.array([[300, 4], [3, 91]]),
                                     "not ids"])
def test_decode_never_raises(tok, garbage):
    score = tok.decode(garbage)
    assert isinstance(score, symusic.Score)


def test_no_note_is_open_after_any_window_restart(tok):
    """A Music Transformer sampling far past its 24-token context (the KV cache rebuilt ~40
    times): every NOTE it draws is followed by its DURATION, so every note of the result
    ends where the model said, whatever window it was drawn in."""
    from mehldau.nn.music_transformer import MusicTransformer, MusicTransformerConfig
    from mehldau.sampling import KVCacheDecoder

    torch.manual_seed(0)
    model = MusicTransformer(MusicTransformerConfig(
        vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2, d_ff=64, max_seq_len=24,
        max_relative_position=16, dropout=0.0)).eval()
    mask = torch.as_tensor(tok.next_token_mask())
    out = sample_tokens(KVCacheDecoder(model, 24), torch.full((2, 1), 1), 200, SamplingConfig(),
                        generator=torch.Generator().manual_seed(1), banned_ids=(0, 1, 2),
                        allowed_next=mask)
    for row in out.numpy():
        notes = np.flatnonzero(np.isin(row, tok.note_range))
        notes = notes[notes < len(row) - 1]
        assert len(notes) > 20 and np.isin(row[notes + 1], tok.duration_range).all()
        clock = np.cumsum(tok.seconds_per_id()[row] * 100).round()
        struck = {(clock[i], row[i]) for i in notes}  # one key struck twice at once is one
        assert len(decoded(tok, row)) == len(struck)
