"""Moonbeam's packed crops and its per-attribute sampler (cached and uncached)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mehldau.constants import IGNORE_INDEX
from mehldau.data.dataset import Augmentation
from mehldau.data.packing import EventWindowDataset, PackedCropDataset, split_samples
from mehldau.nn.moonbeam import MoonbeamConfig, MoonbeamForCausalLM
from mehldau.sampling import SamplingConfig
from mehldau.sampling_compound import EventSampling, sample_events
from mehldau.tokenize.base import build_tokenizer

TOK = build_tokenizer("moonbeam", {"onset_vocab_size": 34, "dur_vocab_size": 34})


def piece(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    onset = np.cumsum(rng.integers(0, 25, n))
    ev = np.stack([onset, rng.integers(1, 30, n), rng.integers(3, 8, n), rng.integers(0, 12, n),
                   np.zeros(n, int), rng.integers(20, 110, n)], 1)
    return np.concatenate([[[-1] * 6], ev, [[-2] * 6]])


SEQS = [piece(150, 0), piece(12, 1), piece(6, 2)]


def test_packed_crops_keep_samples_apart_and_label_only_real_targets() -> None:
    ds = PackedCropDataset(SEQS, 48, TOK, seed=3, augment=Augmentation(2, (0.9, 1.1)))
    for i in range(20):
        item = ds[i]
        ids, labels, sample = item["input_ids"], item["labels"], item["attention_mask"]
        assert ids.shape == (48, 6) and labels.shape == (48, 7) and sample.shape == (48,)
        # sample ids run 1, 1, ..., 2, 2, ..., then 0 for padding
        real = sample[sample > 0]
        assert (real.diff() >= 0).all() and (real.diff() <= 1).all() and real[0] == 1
        assert (ids[sample == 0] == 0).all() and (labels[sample == 0] == IGNORE_INDEX).all()
        for k in real.unique():
            rows, lab = ids[sample == k].numpy(), labels[sample == k].numpy()
            assert (rows[0] == -1).all() and (lab[0] == IGNORE_INDEX).all()  # SOS: no target
            assert rows[1, 0] == 0  # each crop re-based to its first event
            assert (lab[1:] == TOK.to_labels(rows)[1:]).all()
    assert ds[5]["input_ids"].equal(ds[5]["input_ids"])  # item i is a function of (seed, i)
    assert not ds[5]["input_ids"].equal(ds[6]["input_ids"])


def test_crops_end_with_eos_only_at_a_sample_end() -> None:
    ds = PackedCropDataset([piece(45, 4)], 40, TOK, seed=0)  # 8 places for a crop of 38
    ends = 0
    for i in range(30):
        rows = ds[i]["input_ids"].numpy()
        eos = (rows[:, 0] == -2).sum()
        ends += eos
        assert eos <= 1
    assert 0 < ends < 30  # some crops reach the end, most do not


def test_evaluation_windows_predict_every_event_once() -> None:
    ds = EventWindowDataset(SEQS, 40, TOK)
    targets = sum(int((ds[i]["labels"][1:, 1] != IGNORE_INDEX).sum()) for i in range(len(ds)))
    n_events = sum(len(s) for s in split_samples(SEQS))
    assert targets == n_events + len(SEQS)  # every event, plus each sample's EOS


def tiny_model() -> MoonbeamForCausalLM:
    torch.manual_seed(0)
    return MoonbeamForCausalLM(MoonbeamConfig.tiny()).eval()


def test_masked_sampling_stays_in_each_attribute_range() -> None:
    model = tiny_model()
    prompt = torch.full((4, 1, 6), -1)
    opts = EventSampling(SamplingConfig(temperature=2.0), pitch_range=(40, 80))
    rows = sample_events(model, TOK, prompt, 60, opts, context_len=24,
                         generator=torch.Generator().manual_seed(0))
    for r in rows:
        ev = r[1:]
        assert len(ev) == 60
        delta = np.diff(ev[:, 0], prepend=0)
        assert (delta >= 0).all() and (delta <= TOK.max_shift).all()
        assert ((ev[:, 1] >= 1) & (ev[:, 1] <= TOK.max_dur)).all()
        pitch = ev[:, 2] * 12 + ev[:, 3]
        assert ((pitch >= 40) & (pitch <= 80)).all() and (ev[:, 3] <= 11).all()
        assert (ev[:, 4] == 0).all()  # the piano, forced
        assert ((ev[:, 5] >= 1) & (ev[:, 5] <= 127)).all()
        assert TOK.decode(r).note_num() == 60  # every row is a playable note


def test_without_instrument_forcing_programs_are_sampled() -> None:
    opts = EventSampling(SamplingConfig(temperature=3.0), instrument=None)
    rows = sample_events(tiny_model(), TOK, torch.full((2, 1, 6), -1), 40, opts, 24,
                         generator=torch.Generator().manual_seed(1))
    programs = np.concatenate([r[1:, 4] for r in rows])
    assert len(set(programs.tolist())) > 1 and programs.max() <= 128


@pytest.mark.parametrize("context", [16, 64])
def test_cached_sampling_equals_uncached_across_window_restarts(context: int) -> None:
    model = tiny_model()
    prompt = torch.tensor([[[-1] * 6, [0, 10, 5, 0, 0, 80], [5, 10, 5, 4, 0, 80]]]).repeat(2, 1, 1)
    opts = EventSampling(SamplingConfig(temperature=1.0, top_p=0.9))
    out = [sample_events(model, TOK, prompt, 45, opts, context,
                         generator=torch.Generator().manual_seed(2), use_cache=c)
           for c in (True, False)]
    for a, b in zip(*out):
        assert a.shape == (48, 6) and np.array_equal(a, b)
        assert np.array_equal(a[:3], prompt[0].numpy())  # the prompt is kept
        assert (np.diff(a[1:, 0]) >= 0).all()  # absolute onsets across restarts


def test_sampling_stops_at_max_ticks_and_at_eos() -> None:
    model = tiny_model()
    rows = sample_events(model, TOK, torch.full((2, 1, 6), -1), 500,
                         EventSampling(SamplingConfig()), 32, max_ticks=100,
                         generator=torch.Generator().manual_seed(0))
    for r in rows:
        assert 1 < len(r) < 501 and r[1:, 0].max() < 100
    # Make Δonset's EOS class certain: with allow_eos every sample ends before its first
    # event; without it the class is masked and sampling runs to the limit.
    decode = model.decode

    def eos_decode(s, ids, h=None):
        logits, h = decode(s, ids, h)
        logits[..., int(TOK.offsets[0] + TOK.eos_classes[0])] = 50.0
        return logits, h

    model.decode = eos_decode
    prompt = torch.full((2, 1, 6), -1)
    stop = sample_events(model, TOK, prompt, 50, EventSampling(SamplingConfig(), allow_eos=True),
                         32, generator=torch.Generator().manual_seed(0))
    assert all(len(r) == 1 for r in stop)
    go = sample_events(model, TOK, prompt, 50, EventSampling(SamplingConfig()), 32,
                       generator=torch.Generator().manual_seed(0))
    assert all(len(r) == 51 for r in go)


def test_static_cache_samples_what_the_concatenated_one_does_and_never_reallocates() -> None:
    """The fast path (buffers written in place) against the plain one (concatenation), past
    the context so that both restart the window, and uncached as a third witness."""
    from mehldau.nn.relative_attention import StaticKV
    from mehldau.sampling_compound import EventDecoder

    model = tiny_model()
    prompt = torch.tensor([[[-1] * 6, [0, 10, 5, 0, 0, 80], [5, 10, 5, 4, 0, 80]]]).repeat(3, 1, 1)
    opts = EventSampling(SamplingConfig(temperature=1.0, top_p=0.95))
    out = [sample_events(model, TOK, prompt, 50, opts, 16, use_cache=c, static=s,
                         generator=torch.Generator().manual_seed(4))
           for c, s in ((True, True), (True, False), (False, True))]
    for a, b, c in zip(*out):
        assert a.shape == (53, 6) and np.array_equal(a, b) and np.array_equal(a, c)
    dec = EventDecoder(model, 16)
    dec.prefill(prompt)
    first = dec.past[0]
    assert isinstance(first, StaticKV) and first.length == 3 and first.k.shape[2] == 16
    ptrs = [(p.k.data_ptr(), p.v.data_ptr()) for p in dec.past]
    row = torch.tensor([[9, 10, 5, 2, 0, 70]]).repeat(3, 1)
    for _ in range(13):  # fills the window to 16 rows: no restart yet
        row[:, 0] += 3
        dec.step(row)
    assert dec.past[0] is first and first.length == 16
    assert [(p.k.data_ptr(), p.v.data_ptr()) for p in dec.past] == ptrs
    dec.step(row)  # the 17th row restarts the window: SOS + the last 8 rows, in new buffers
    assert dec.past[0] is not first and dec.past[0].length == 9


@pytest.mark.parametrize("opts", [
    EventSampling(SamplingConfig()),
    EventSampling(SamplingConfig(), pitch_range=(40, 80), instrument=None, allow_eos=True),
])
def test_masks_built_once_are_the_per_event_masks(opts: EventSampling) -> None:
    """The sampler builds its masks once per call; each must be the one `_allowed` gives
    for that attribute (and, for pitch class, for every octave that can be sampled)."""
    from mehldau.sampling_compound import OCTAVE, PITCH, _allowed, _blocked_tables

    V = 357
    blocked, pitch = _blocked_tables(TOK, opts, V, torch.device("cpu"))
    for a in range(6):
        assert torch.equal(blocked[a], ~_allowed(TOK, a, opts, None, V, 1, "cpu"))
    assert pitch.shape == (int(TOK.sizes[OCTAVE]), V)
    for o in range(int(TOK.sizes[OCTAVE])):
        assert torch.equal(pitch[o], ~_allowed(TOK, PITCH, opts, torch.tensor([o]), V, 1,
                                               "cpu")[0])
    assert sample_events(tiny_model(), TOK, torch.full((2, 1, 6), -1), 0, opts, 16)[1].shape \
        == (1, 6)
