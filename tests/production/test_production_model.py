"""Music Transformer: loss, KV-cached decoding equals full recompute, sampling filters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mehldau.nn.music_transformer import MusicTransformer, MusicTransformerConfig
from mehldau.sampling import KVCacheDecoder, SamplingConfig, filter_logits, sample_tokens


def tiny(**kw) -> MusicTransformer:
    cfg = MusicTransformerConfig(vocab_size=40, n_layers=2, d_model=32, n_heads=4, d_ff=64,
                                 max_seq_len=128, max_relative_position=16, dropout=0.0, **kw)
    torch.manual_seed(0)
    model = MusicTransformer(cfg).eval()
    with torch.no_grad():  # a non-trivial relative table, so a broken gather would show
        for layer in model.layers:
            layer.attn.rel_emb.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_loss_is_mean_cross_entropy_over_labelled_tokens(activation: str) -> None:
    model = tiny(activation=activation)
    ids = torch.randint(3, 40, (2, 20))
    labels = ids.roll(-1, 1)
    labels[:, -3:] = -100
    out = model(ids, labels=labels)
    ref = F.cross_entropy(out.logits[:, :-3].reshape(-1, 40), labels[:, :-3].reshape(-1))
    assert torch.allclose(out.loss, ref, atol=1e-6)


def test_kv_cache_gives_full_recompute_logits_at_every_step() -> None:
    model = tiny()
    torch.manual_seed(1)
    prompt = torch.randint(3, 40, (2, 1))
    gen = torch.Generator().manual_seed(0)
    seqs = sample_tokens(KVCacheDecoder(model, 128), prompt, 63, SamplingConfig(), gen)
    assert seqs.shape == (2, 64)
    with torch.no_grad():
        full = model(seqs).logits  # (B, 64, V)
        past = None
        for t in range(64):
            out = model(seqs[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            assert torch.allclose(out.logits[:, 0], full[:, t], atol=1e-5), f"step {t}"
    assert past[0][0].shape == (2, 4, 64, 8)  # (B, H, T, Dh) per layer


def test_cached_and_uncached_sampling_agree_within_context() -> None:
    model = tiny()
    prompt = torch.randint(3, 40, (3, 5))
    runs = [sample_tokens(KVCacheDecoder(model, 128, use_cache=c), prompt, 40,
                          SamplingConfig(top_k=10), generator=torch.Generator().manual_seed(3))
            for c in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_rebuilding_all_but_one_token_is_the_sliding_window_exactly() -> None:
    """Past the context the cache is rebuilt from the last `keep` tokens; with keep =
    context - 1 that is the uncached sliding window, token for token."""
    model = tiny()
    prompt = torch.randint(3, 40, (2, 3))
    runs = [sample_tokens(KVCacheDecoder(model, 24, use_cache=c, keep=23), prompt, 60,
                          SamplingConfig(), generator=torch.Generator().manual_seed(5))
            for c in (True, False)]
    assert torch.equal(runs[0], runs[1])
    assert KVCacheDecoder(model, 24).keep == 21  # by default 7/8 of the window
    with pytest.raises(ValueError, match="keep"):
        KVCacheDecoder(model, 24, keep=24)


def test_sampling_past_the_context_refills_the_cache() -> None:
    model = tiny()
    seqs = sample_tokens(KVCacheDecoder(model, 24), torch.ones(1, 1, dtype=torch.long), 100,
                         SamplingConfig(), generator=torch.Generator().manual_seed(0))
    assert seqs.shape == (1, 101)


def test_eos_and_seconds_stop_sampling() -> None:
    model = tiny()
    secs = torch.zeros(40)
    secs[10:20] = 0.5
    out = sample_tokens(KVCacheDecoder(model, 128), torch.ones(4, 1, dtype=torch.long), 500,
                        SamplingConfig(),
                        generator=torch.Generator().manual_seed(0), eos_id=2,
                        seconds_per_id=secs, max_seconds=2.0)
    assert out.shape[1] < 501
    assert out.shape[1] > 2
    for row in out:
        gen = row[1:]
        over = (secs[gen].cumsum(0) >= 2.0).nonzero()
        eos = (gen == 2).nonzero()
        first = min(int(x[0]) for x in (over, eos) if len(x))
        assert (gen[first + 1 :] == 2).all()  # after stopping, only EOS padding


def test_filter_logits_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    k2 = filter_logits(logits, SamplingConfig(top_k=2))
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p = filter_logits(logits, SamplingConfig(top_p=0.7))  # 0.5 + 0.25 reaches 0.7
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    p_small = filter_logits(logits, SamplingConfig(top_p=0.1))  # the top token always stays
    assert torch.isfinite(p_small[0, 0]) and torch.isinf(p_small[0, 1:]).all()
    t = filter_logits(logits, SamplingConfig(temperature=2.0))
    assert torch.allclose(t, logits / 2)


def test_bad_config_values_raise() -> None:
    with pytest.raises(ValueError):
        MusicTransformerConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError):
        SamplingConfig(temperature=0)


@pytest.mark.parametrize("rows,activation,kernel", [
    (1, "gelu", "onednn"), (3, "gelu", "onednn"), (1, "swiglu", "onednn"),
    (1, "gelu", "blas"), (3, "swiglu", "blas"), (3, "gelu", "dense")])
def test_the_static_cache_and_fused_step_sample_what_the_plain_path_does(
        rows: int, activation: str, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast paths (buffers written in place; then fused weights in each kernel's layout:
    oneDNN-packed, transposed for addmm, or as the modules hold them) against the plain one
    (concatenation, steps through the modules), past the context so that all rebuild, with a
    pinned prefix token."""
    from mehldau.nn import fused_step
    from mehldau.nn.relative_attention import StaticKV

    if kernel == "onednn" and not fused_step.onednn_available(torch.zeros(1)):
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setenv(fused_step.KERNEL_ENV, kernel)
    model = tiny(activation=activation)
    prompt = torch.randint(3, 40, (rows, 4))
    runs = [sample_tokens(KVCacheDecoder(model, 24, prefix_len=1, static=s, fused=f), prompt,
                          70, SamplingConfig(top_p=0.9),
                          generator=torch.Generator().manual_seed(7))
            for s, f in ((True, True), (True, False), (False, False))]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    dec, plain = KVCacheDecoder(model, 24), KVCacheDecoder(model, 24, static=False)
    assert dec.fast is None
    torch.testing.assert_close(dec.prefill(prompt), plain.prefill(prompt))
    assert dec.fast is not None and dec.fast.kernel == kernel and dec.fast.rows == rows
    first = dec.past[0]
    assert isinstance(first, StaticKV) and first.length == 4
    ptr = first.k.data_ptr()
    for t in range(10):
        tok = torch.full((rows,), 5 + t)
        torch.testing.assert_close(dec.step(tok), plain.step(tok), atol=1e-5, rtol=1e-5)
    assert dec.past[0] is first and first.k.data_ptr() == ptr and first.length == 14
    with pytest.raises(ValueError, match="rebuild"):
        first.extend(*(torch.zeros(rows, first.k.shape[1], 11, first.k.shape[3]),) * 2)
    full = StaticKV(*(torch.zeros(rows, 2, 1, 3),) * 2, capacity=2)
    assert full.append(*(torch.ones(rows, 2, 3),) * 2) == 2 and full.k[:, :, 1].eq(1).all()
    with pytest.raises(ValueError, match="rebuild"):
        full.append(*(torch.ones(rows, 2, 3),) * 2)


@pytest.mark.parametrize("rows,kernel", [(1, "onednn"), (3, "onednn"), (3, "blas"),
                                         (1, "dense")])
def test_the_fused_step_keeps_projection_biases_with_their_heads(
        rows: int, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused q/k/v product puts each head's q, k and v side by side; biases must move with
    their rows (the presets have none, a model built with them would), in every kernel."""
    from mehldau.nn import fused_step

    if kernel == "onednn" and not fused_step.onednn_available(torch.zeros(1)):
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setenv(fused_step.KERNEL_ENV, kernel)
    model = tiny()
    torch.manual_seed(1)
    for layer in model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            old = getattr(layer.attn, name)
            new = torch.nn.Linear(old.in_features, old.out_features)
            with torch.no_grad():
                new.weight.copy_(old.weight)
                new.bias.normal_(0, 0.5)
            setattr(layer.attn, name, new)
    prompt = torch.randint(3, 40, (rows, 4))
    dec, plain = KVCacheDecoder(model, 24), KVCacheDecoder(model, 24, static=False)
    torch.testing.assert_close(dec.prefill(prompt), plain.prefill(prompt))
    assert dec.fast is not None and dec.fast.kernel == kernel
    for t in range(6):
        tok = torch.full((rows,), 5 + t)
        torch.testing.assert_close(dec.step(tok), plain.step(tok), atol=1e-5, rtol=1e-5)


def _graph_runs(model: MusicTransformer, prompt: torch.Tensor) -> list[torch.Tensor]:
    """Samples past the context (every cache rebuilt) through the graphed step, the fused one
    and the plain path, one seed."""
    return [sample_tokens(KVCacheDecoder(model, 24, prefix_len=1, static=s, fused=s, graph=g),
                          prompt, 70, SamplingConfig(top_p=0.9),
                          generator=torch.Generator(prompt.device).manual_seed(7))
            for s, g in ((True, True), (True, False), (False, False))]


@pytest.mark.parametrize("rows,activation", [(1, "gelu"), (3, "gelu"), (2, "swiglu")])
def test_the_graphed_steps_masked_form_samples_what_the_plain_path_does(
        rows: int, activation: str) -> None:
    """The CUDA graph's step (every key of the whole cache, the unwritten ones masked, the
    relative term gathered by distance), run without recording here, against the plain path;
    the caches move into its buffers; a second live decoder steps through `FusedStep`."""
    from mehldau.nn.fused_step import FusedStep
    from mehldau.nn.graphed_step import GraphedStep

    model = tiny(activation=activation)
    prompt = torch.randint(3, 40, (rows, 4))
    runs = _graph_runs(model, prompt)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    dec, plain = KVCacheDecoder(model, 24, graph=True), KVCacheDecoder(model, 24, static=False)
    other = KVCacheDecoder(model, 24, graph=True)
    torch.testing.assert_close(dec.prefill(prompt), plain.prefill(prompt))
    other.prefill(prompt)
    assert isinstance(dec.fast, GraphedStep) and type(other.fast) is FusedStep  # one owner
    moved, caches = 0, set()
    for t in range(40):  # past 24: rebuilds, each copied into the graph's buffers
        tok = torch.full((rows,), 5 + t % 30)
        torch.testing.assert_close(dec.step(tok), plain.step(tok), atol=1e-5, rtol=1e-5)
        other.step(tok)
        if dec.past is dec.fast.loaded:  # a graphed step, not a rebuild
            assert all(c.k is k for c, k in zip(dec.past, dec.fast.k))
            moved += 1
            caches.add(id(dec.past))
    assert moved >= 30 and len(caches) >= 3  # the prefill's caches, then two rebuilds'
    torch.testing.assert_close(other.step(tok), dec.step(tok), atol=1e-5, rtol=1e-5)
    del dec
    free = KVCacheDecoder(model, 24, graph=True)
    free.prefill(prompt)
    assert isinstance(free.fast, GraphedStep)  # released with its owner


def test_graphed_steps_are_kept_per_batch_size_until_a_weight_changes() -> None:
    """A comparison alternating batch sizes records each size's graph once, not at every
    switch; a changed weight drops them with the fused step they were built on."""
    from mehldau.nn.graphed_step import graphed_step_for

    class Owner:  # a decoder, as far as the graph can tell
        pass

    model = tiny()
    caps, a, b = [24] * len(model.layers), Owner(), Owner()
    one = graphed_step_for(model, 1, caps, a, capture=False)
    three = graphed_step_for(model, 3, caps, b, capture=False)
    assert one is not None and three is not None and one is not three
    assert graphed_step_for(model, 1, caps, a, capture=False) is one
    assert graphed_step_for(model, 3, caps, b, capture=False) is three
    assert graphed_step_for(model, 1, caps, b, capture=False) is None  # a holds it
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    fresh = graphed_step_for(model, 1, caps, a, capture=False)
    assert fresh is not None and fresh is not one
    assert fresh.step.head[0].data_ptr() != one.step.head[0].data_ptr()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 3])
def test_the_cuda_graph_samples_what_the_plain_path_does(rows: int) -> None:
    """Recorded and replayed on the GPU (fp32): the same tokens as the eager fused step and
    the plain path past the context, and the same logits as the masked step run eagerly."""
    from mehldau.nn.fused_step import FusedStep
    from mehldau.nn.graphed_step import GraphedStep

    model = tiny().cuda()
    prompt = torch.randint(3, 40, (rows, 4), device="cuda")
    runs = _graph_runs(model, prompt)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    graphed, ref = KVCacheDecoder(model, 24, graph=True), KVCacheDecoder(model, 24, graph=False)
    torch.testing.assert_close(graphed.prefill(prompt), ref.prefill(prompt))
    assert isinstance(graphed.fast, GraphedStep) and graphed.fast.graph is not None
    eager = GraphedStep(FusedStep.for_model(model, rows), [24] * len(model.layers),
                        capture=False)
    for t in range(19):  # up to the full cache, so both hold the same state
        tok = torch.full((rows,), 5 + t, device="cuda")
        torch.testing.assert_close(graphed.step(tok), eager(tok, ref.past), atol=1e-6,
                                   rtol=1e-6)


def test_each_kind_of_product_keeps_the_kernel_that_ran_it_fastest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """q/k/v, the output projection, the feed-forward's up (with its GELU) and down (with its
    residual add) and the head each keep the kernel that ran them fastest, on timings the test
    sets (so it does not depend on this machine's speed); the step mixed from them samples
    what the plain path does; the variable fixes one kernel, and a kernel that does not exist
    is refused by name."""
    from mehldau.nn import fused_step
    from mehldau.nn.fused_step import SLOTS, FusedStep

    monkeypatch.delenv(fused_step.KERNEL_ENV, raising=False)
    usable = fused_step.kernels_for(torch.zeros(1))
    assert usable[-2:] == ["blas", "dense"]
    model = tiny()
    assert set(FusedStep(model, 1).products()) == set(SLOTS)  # every slot's products timed
    cost = {"onednn": dict(qkv=3.0, o=3.0, up=1.0, down=3.0, head=3.0),
            "blas": dict(qkv=1.0, o=2.0, up=2.0, down=2.0, head=1.0),
            "dense": dict(qkv=2.0, o=1.0, up=3.0, down=1.0, head=2.0)}
    monkeypatch.setattr(FusedStep, "products", lambda self: dict(cost[self.kernel]))
    want = {"qkv": "blas", "o": "dense", "up": "onednn" if "onednn" in usable else "blas",
            "down": "dense", "head": "blas"}
    step = FusedStep.fastest(model, 2)
    assert step.kernels == want and step.rows == 2
    assert step.kernel == ", ".join(f"{s} {want[s]}" for s in SLOTS)
    assert step.seconds == {k: sum(cost[k].values()) for k in usable}
    C = model.config.d_model
    assert step.layers[0].w["qkv"][0].shape == (C, 3 * C)  # blas: transposed, (in, out)
    prompt = torch.randint(3, 40, (2, 4))
    runs = [sample_tokens(KVCacheDecoder(model, 24, prefix_len=1, static=s, fused=s), prompt,
                          60, SamplingConfig(top_p=0.9),
                          generator=torch.Generator().manual_seed(3)) for s in (True, False)]
    assert torch.equal(runs[0], runs[1])
    assert FusedStep.for_model(model, 2).kernels == want  # the decoder's step was this mix
    cost["blas"]["qkv"] = 5.0
    assert FusedStep.fastest(model, 2).kernels["qkv"] == "dense"
    for k in cost:
        cost[k] = dict.fromkeys(SLOTS, 1.0 if k == "dense" else 2.0)
    uniform = FusedStep.fastest(model, 2)
    assert uniform.kernel == "dense" and uniform.kernels == dict.fromkeys(SLOTS, "dense")
    monkeypatch.setenv(fused_step.KERNEL_ENV, "blas")
    assert fused_step.kernels_for(torch.zeros(1)) == ["blas"]
    assert FusedStep.fastest(model, 2).kernel == "blas"
    assert fused_step.kernels_for(torch.zeros(1, dtype=torch.bfloat16)) == ["dense"]
    monkeypatch.setenv(fused_step.KERNEL_ENV, "mkl")
    with pytest.raises(ValueError, match="MEHLDAU_STEP_KERNEL='mkl' is not a kernel"):
        fused_step.kernels_for(torch.zeros(1))


def test_the_fused_step_is_kept_on_the_model_until_a_weight_changes() -> None:
    """Built once per batch size (the copy would delay every first note), never stale: a
    weight changed in place or replaced makes the next decoder copy the weights again."""
    model = tiny()
    prompt = torch.randint(3, 40, (1, 4))

    def fresh_logits() -> tuple[torch.Tensor, torch.Tensor, object]:
        dec, plain = KVCacheDecoder(model, 24), KVCacheDecoder(model, 24, static=False)
        dec.prefill(prompt), plain.prefill(prompt)
        return dec.step(torch.tensor([7])), plain.step(torch.tensor([7])), dec.fast

    a, b, first = fresh_logits()
    torch.testing.assert_close(a, b)
    assert fresh_logits()[2] is first
    # another batch size gets its own copy, and the first stays
    three = KVCacheDecoder(model, 24)
    three.prefill(prompt.expand(3, -1))
    assert three.fast is not first and three.fast.rows == 3
    assert fresh_logits()[2] is first
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight.mul_(3.0)
    a, b, second = fresh_logits()
    assert second is not first
    torch.testing.assert_close(a, b)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 2)
    a, b, third = fresh_logits()
    assert third is not second
    torch.testing.assert_close(a, b)
    # the packed copies live beside the model: one that has sampled still deep-copies and saves
    import copy
    import io

    twin = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    dec = KVCacheDecoder(twin, 24)
    dec.prefill(prompt)
    torch.testing.assert_close(dec.step(torch.tensor([7])), a)
    assert dec.fast is not third


def test_the_fused_step_stands_aside_for_models_it_cannot_copy() -> None:
    """A LoRA-wrapped model (its projections are not plain Linear) or one in training mode
    samples through the modules, so an unmerged adapter still counts."""
    from peft import LoraConfig, get_peft_model

    model = tiny()
    lora = get_peft_model(tiny(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False)).eval()
    dec = KVCacheDecoder(lora.base_model.model, 24)
    prompt = torch.randint(3, 40, (1, 4))
    dec.prefill(prompt)
    assert dec.fast is None
    merged = KVCacheDecoder(lora.merge_and_unload(), 24)
    merged.prefill(prompt)
    assert merged.fast is not None
    model.train()
    dec = KVCacheDecoder(model, 24)
    dec.prefill(prompt)
    assert dec.fast is None
