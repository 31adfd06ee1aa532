"""Perceiver AR (src/mehldau/nn/perceiver_ar.py): masks, equivalences, cache, datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from mehldau.constants import IGNORE_INDEX
from mehldau.data.dataset import Augmentation
from mehldau.data.perceiver_windows import PerceiverCropDataset, PerceiverWindowDataset
from mehldau.nn.perceiver_ar import PerceiverAR, PerceiverARConfig
from mehldau.sampling import PerceiverDecoder
from mehldau.tokenize import build_tokenizer

V, M, N = 40, 24, 8
P = M - N  # prefix positions of a full window


def tiny(**kw) -> PerceiverAR:
    args = dict(vocab_size=V, n_layers=3, d_model=32, n_heads=4, d_ff=64, max_seq_len=M,
                num_latents=N, max_relative_position=16, dropout=0.0, prefix_dropout=0.0)
    args.update(kw)
    torch.manual_seed(0)
    model = PerceiverAR(PerceiverARConfig(**args)).eval()
    with torch.no_grad():  # a non-trivial relative table, so a wrong distance would show
        for layer in model.layers:
            layer.attn.rel_emb.normal_(0, 1.0)
    return model


def ids(B: int = 2, T: int = M, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


def plain_transformer_logits(model: PerceiverAR, x: torch.Tensor) -> torch.Tensor:
    """The same weights as a plain causal Transformer: every layer's Block.forward."""
    h = model.embed_tokens(x)
    for layer in model.layers:
        h, _ = layer(h)
    return model.lm_head(model.norm(h))  # (B, T, V)


# --- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(num_latents=32), dict(prefix_dropout=1.0),
                                 dict(prefix_dropout=-0.1), dict(d_model=30), dict(n_layers=0),
                                 dict(refill=9), dict(activation="relu")])
def test_config_rejects_bad_values(bad: dict) -> None:
    args = dict(max_seq_len=M, num_latents=N, d_model=32, n_heads=4) | bad
    with pytest.raises(ValueError):
        PerceiverARConfig(**args)


def test_config_defaults_and_refill_fill() -> None:
    cfg = PerceiverARConfig()
    assert (cfg.max_seq_len, cfg.num_latents, cfg.refill_latents) == (8192, 1024, 896)
    assert PerceiverARConfig(num_latents=2048).refill_latents == 1920  # Flaxformer's example
    assert PerceiverARConfig(max_seq_len=M, num_latents=N).refill_latents == 4
    assert PerceiverARConfig(**cfg.to_dict()) == cfg


# --- the model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("j", [0, 3, P - 1, P, P + 3, M - 1])
def test_causal_mask_by_perturbation(j: int) -> None:
    model = tiny()
    x = ids()
    y = x.clone()
    y[:, j] = (y[:, j] - 3 + 1) % (V - 3) + 3  # another real token
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits  # (B, N, V)
    first = max(j - P, 0)  # latent index of position j (all latents if j is in the prefix)
    torch.testing.assert_close(a[:, :first], b[:, :first], atol=0, rtol=0)
    assert (a[:, first:] - b[:, first:]).abs().amax(dim=-1).min() > 1e-6  # every later one


@pytest.mark.parametrize("T,num_latents", [(N, None), (6, None), (M, M), (13, 13)])
def test_all_latents_is_a_plain_causal_transformer(T: int, num_latents: int | None) -> None:
    model = tiny()
    x = ids(T=T)
    with torch.no_grad():
        got = model(x, num_latents=num_latents).logits
        ref = plain_transformer_logits(model, x)
    assert got.shape == (2, T, V)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_one_layer_model_is_the_plain_transformer_at_the_latents() -> None:
    # With one layer, the rectangular cross-attention (gather path) must reproduce the square
    # skew path's rows: a check of the relative distances in the N x M case.
    model = tiny(n_layers=1)
    x = ids()
    with torch.no_grad():
        got = model(x).logits
        ref = plain_transformer_logits(model, x)[:, -N:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_loss_is_cross_entropy_over_latent_labels_only() -> None:
    model = tiny()
    x = ids()
    labels = x.roll(-1, 1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, -5] = IGNORE_INDEX
    out = model(x, labels=labels)
    ref = F.cross_entropy(out.logits.reshape(-1, V), labels[:, -N:].reshape(-1),
                          ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)
    only_latents = labels.clone()
    only_latents[:, :P] = IGNORE_INDEX  # prefix labels never count
    torch.testing.assert_close(model(x, labels=only_latents).loss, out.loss)


def test_left_padding_gives_the_unpadded_logits() -> None:
    model = tiny()
    x = ids()
    pads = (10, 3)  # different per row
    padded = x.clone()
    mask = torch.ones(2, M, dtype=torch.bool)
    for r, k in enumerate(pads):
        padded[r, :k] = 0
        mask[r, :k] = False
    with torch.no_grad():
        got = model(padded, attention_mask=mask).logits
        for r, k in enumerate(pads):
            ref = model(x[r : r + 1, k:]).logits[0]  # the shorter input, N latents too
            torch.testing.assert_close(got[r], ref, atol=1e-5, rtol=1e-5)
        # without the mask the padding is attended to: the test can fail
        assert not torch.allclose(model(padded).logits, got, atol=1e-4)


def test_prefix_dropout_only_in_training_and_only_on_the_prefix() -> None:
    model = tiny(prefix_dropout=0.5)
    ref = tiny(prefix_dropout=0.0)  # same seed, same weights
    x = ids()
    with torch.no_grad():
        evald = model(x).logits
        torch.testing.assert_close(evald, ref(x).logits, atol=0, rtol=0)
        model.train()
        torch.manual_seed(3)
        assert not torch.allclose(model(x).logits, evald, atol=1e-4)
        # no prefix, nothing to drop: latents are never dropped
        torch.testing.assert_close(model(x[:, -N:]).logits, ref(x[:, -N:]).logits,
                                   atol=1e-6, rtol=1e-6)
        # random per batch element: the same row twice gets different masks
        twice = x[:1].expand(2, M)
        out = model(twice).logits
        assert not torch.allclose(out[0], out[1], atol=1e-4)
        # dropping (nearly) every prefix key leaves the latents alone, themselves included
        model.config.prefix_dropout = 1.0 - 1e-9
        torch.testing.assert_close(model(x).logits, ref(x[:, -N:]).logits, atol=1e-5,
                                   rtol=1e-5)


def test_cached_forward_appends_latents() -> None:
    model = tiny()
    x = ids(T=20)
    with torch.no_grad():
        full = model(x, num_latents=8).logits  # window 0..19, latents 12..19
        out = model(x[:, :17], num_latents=5, use_cache=True)  # latents 12..16
        assert [k.shape[2] for k, _ in out.past_key_values] == [17, 5, 5]
        step = model(x[:, 17:], past_key_values=out.past_key_values, use_cache=True)
        assert [k.shape[2] for k, _ in step.past_key_values] == [20, 8, 8]
    torch.testing.assert_close(step.logits, full[:, -3:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        model(x[:, :1], past_key_values=out.past_key_values, num_latents=1)


@pytest.mark.parametrize("static,fused,graph", [(True, True, False), (True, True, True),
                                               (False, False, False)])
@pytest.mark.parametrize("prefix_len", [0, 1])
@pytest.mark.parametrize("prompt_len,refill", [(3, 0), (30, 0), (2, 6)])
def test_cached_decoding_equals_uncached_across_refills(prefix_len: int, prompt_len: int,
                                                        refill: int, static: bool, fused: bool,
                                                        graph: bool) -> None:
    """The plain cache (concatenated, steps through the modules), the fast one (buffers
    written in place, `FusedStep`) and the CUDA graph's masked step (not recorded here; its
    caches of two capacities, the window's and the latents') against the uncached
    reference."""
    from mehldau.nn.graphed_step import GraphedStep

    model = tiny(refill=refill)
    fill = refill or 4
    cached = PerceiverDecoder(model, use_cache=True, prefix_len=prefix_len, static=static,
                              fused=fused, graph=graph)
    plain = PerceiverDecoder(model, use_cache=False, prefix_len=prefix_len)
    seq = ids(T=prompt_len + 60, seed=2)
    a, b = cached.prefill(seq[:, :prompt_len]), plain.prefill(seq[:, :prompt_len])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for t in range(prompt_len, seq.size(1)):
        a, b = cached.step(seq[:, t]), plain.step(seq[:, t])
        assert (cached.window_start, cached.latent_start) == (plain.window_start,
                                                              plain.latent_start)
        assert cached.n_latents <= N and cached.window_len() <= M
        # the state reproduces the step as one uncached forward
        with torch.no_grad():
            ref = model(cached.window(), num_latents=cached.n_latents).logits[:, -1]
        torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        if prefix_len:
            assert torch.equal(cached.window()[:, 0], seq[:, 0])  # the style token stays
        lengths = [kv.length if static else kv[0].shape[2] for kv in cached.past]
        assert lengths == [cached.window_len()] + [cached.n_latents] * 2
    assert cached.refills == plain.refills
    assert (cached.fast is not None) == fused
    assert isinstance(cached.fast, GraphedStep) == graph
    # latent-full refills while the whole history fits, window-sliding ones past M
    assert any(s == 0 for _, s in cached.refills) or prompt_len > M - (N - fill)
    assert sum(s > 0 for _, s in cached.refills) >= 3
    assert len(cached.refills) >= (60 - N) // (N - fill + 1)  # N - fill cached steps, 1 refill
    for n, s in cached.refills:  # refill layout: fill latents, window min(n, M - (N - fill))
        want = min(n, M - (N - fill))
        assert s == (0 if n <= want else n - want + prefix_len)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_graph_samples_what_the_plain_path_does_across_refills() -> None:
    """Recorded and replayed on the GPU (fp32), caches of two capacities, refills included:
    the same tokens as the eager fused step and the plain path for one seed."""
    from mehldau.nn.graphed_step import GraphedStep
    from mehldau.sampling import SamplingConfig, sample_tokens

    model = tiny().cuda()
    prompt = ids(B=3, T=2).cuda()
    decs = [PerceiverDecoder(model, prefix_len=1, static=s, fused=s, graph=g)
            for s, g in ((True, True), (True, False), (False, False))]
    runs = [sample_tokens(d, prompt, 80, SamplingConfig(top_p=0.9),
                          generator=torch.Generator("cuda").manual_seed(5)) for d in decs]
    assert isinstance(decs[0].fast, GraphedStep) and decs[0].fast.graph is not None
    assert len(decs[0].refills) >= 5
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_decoder_rejects_a_prompt_shorter_than_the_prefix() -> None:
    dec = PerceiverDecoder(tiny(), prefix_len=2)
    with pytest.raises(ValueError):
        dec.prefill(ids(T=1))


# --- datasets ----------------------------------------------------------------------------------
def _pieces(lengths=(60, 100, 12, 5)) -> list[np.ndarray]:
    # distinct, increasing values per piece: label == input + 1 wherever a label exists
    return [np.arange(1000 * (k + 1), 1000 * (k + 1) + n, dtype=np.int64)
            for k, n in enumerate(lengths)]


def _check_item(item: dict, prefix_value: int | None = None, consecutive: bool = True) -> None:
    """Layout of one item; `consecutive`: the pieces are runs of consecutive integers."""
    x, y, mask = item["input_ids"], item["labels"], item["attention_mask"]
    assert x.shape == y.shape == mask.shape == (M,) and mask.dtype == torch.bool
    lab = y != IGNORE_INDEX
    assert not lab[:P].any() and lab.any()  # targets only at the latent positions
    assert torch.equal(mask, x != 0)  # padding (pad id 0) is masked, nothing else
    real = mask.nonzero().flatten()
    first, last = int(real[0]), int(real[-1])
    assert mask[first : last + 1].all()  # one contiguous run
    assert last == M - 1 or first == P  # left padded, or right padded inside the latents
    j = lab.nonzero().flatten()
    inner = j[j < last]
    assert torch.equal(y[inner], x[inner + 1])  # shifted by one
    if consecutive:  # the label after the last input is the piece's next token too
        assert torch.equal(y[j], x[j] + 1)
    if prefix_value is not None:  # at the first real position, never a target
        assert x[first] == prefix_value and not lab[first]


@pytest.mark.parametrize("with_prefix", [False, True])
def test_crop_dataset_targets_only_latents_and_shifted(with_prefix: bool) -> None:
    tok = build_tokenizer("performance")
    seqs = _pieces()
    prefixes = [np.array([7]) for _ in seqs] if with_prefix else None
    ds = PerceiverCropDataset(seqs, M, N, tok, seed=3, prefixes=prefixes)
    padded_left = padded_right = full = 0
    for i in range(300):
        item = ds[i]
        _check_item(item, 7 if with_prefix else None)
        x, y = item["input_ids"], item["labels"]
        if int(x.max()) // 1000 in (1, 2, 3):  # 60, 100, 12 tokens: FULL_LATENTS applies,
            assert (y[-N:] != IGNORE_INDEX).all()  # every latent has a real target
        else:  # the 5-token piece: right-padded inside the latents
            assert int(x.max()) // 1000 == 4 and not item["attention_mask"][-1]
        full += bool(item["attention_mask"].all())
        padded_left += bool(not item["attention_mask"][0] and item["attention_mask"][-1])
        padded_right += bool(not item["attention_mask"][-1])
    assert full and padded_left and padded_right  # all three layouts occur


def test_crop_dataset_is_deterministic_with_augmentation() -> None:
    tok = build_tokenizer("performance")
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(3):
        import symusic

        s = symusic.Score(480)
        t = symusic.Track(program=0)
        for i in range(80):
            t.notes.append(symusic.Note(i * 120, 100, int(rng.integers(40, 90)), 80))
        s.tracks.append(t)
        seqs.append(tok.encode(s).astype(np.int64))
    ds = PerceiverCropDataset(seqs, M, N, tok, seed=7, augment=Augmentation(3, (0.9, 1.1)))
    again = PerceiverCropDataset(seqs, M, N, tok, seed=7, augment=Augmentation(3, (0.9, 1.1)))
    a = ds[5]
    assert all(torch.equal(a[k], again[5][k]) for k in a)
    assert not torch.equal(ds[6]["input_ids"], a["input_ids"])
    for i in range(20):
        item = ds[i]
        _check_item(item, consecutive=False)
    with torch.no_grad():  # the trainer's call: model(**batch)
        loss = tiny(vocab_size=tok.vocab_size)(**default_collate([ds[i] for i in range(4)])).loss
    assert torch.isfinite(loss)


@pytest.mark.parametrize("with_prefix", [False, True])
def test_window_dataset_predicts_every_token_once(with_prefix: bool) -> None:
    seqs = _pieces((10, 25, 7, 2, 1, 40))
    prefixes = [np.array([7]) for _ in seqs] if with_prefix else None
    ds = PerceiverWindowDataset(seqs, M, N, pad_id=0, prefixes=prefixes)
    got = []
    for i in range(len(ds)):
        item = ds[i]
        _check_item(item, 7 if with_prefix else None)
        x, y = item["input_ids"], item["labels"]
        got += y[y != IGNORE_INDEX].tolist()
        # the inputs before the first target are the piece's previous tokens (full context)
        real = x[item["attention_mask"]]
        body = real[1:] if with_prefix else real
        assert torch.equal(body, torch.arange(int(body[0]), int(body[0]) + len(body)))
        assert len(real) == M or body[0] % 1000 == 0  # context: as much as fits
    assert got == [t for s in seqs for t in s[1:].tolist()]  # in order, each exactly once
    with torch.no_grad():
        loss = tiny(vocab_size=10_000)(**default_collate([ds[i] for i in range(len(ds))])).loss
    assert torch.isfinite(loss)


def test_datasets_reject_prefix_in_the_latents() -> None:
    with pytest.raises(ValueError):
        PerceiverWindowDataset(_pieces(), M, N, 0, prefixes=[np.arange(P + 1)] * 4)
