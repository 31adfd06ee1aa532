"""Tests for Music Transformer relative self-attention (src/mehldau/nn/relative_attention.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

from mehldau.nn.relative_attention import (
    HAS_FLEX,
    RelativeSelfAttention,
    relative_logits_gather,
    relative_logits_naive,
    relative_logits_skew,
)

B, H, DH = 2, 3, 8


def _lower(L: int) -> torch.Tensor:
    return torch.ones(L, L, dtype=torch.bool).tril()


def _module(impl: str = "skew", R: int = 16, d_model: int = 24, n_heads: int = 3, **kw):
    torch.manual_seed(0)
    return RelativeSelfAttention(d_model, n_heads, R, impl=impl, **kw).eval()


# ------------------------------------------------------------------------------------------------
# Functional forms


def test_naive_matches_definition():
    # Spot-check the reference itself against the formula, including zeros beyond R and above diag.
    torch.manual_seed(0)
    L, R = 7, 4
    q, e = torch.randn(B, H, L, DH), torch.randn(H, R, DH)
    s = relative_logits_naive(q, e)
    for i in range(L):
        for j in range(L):
            d = i - j
            want = (q[:, :, i] * e[:, R - 1 - d]).sum(-1) if 0 <= d < R else torch.zeros(B, H)
            torch.testing.assert_close(s[:, :, i, j], want)


@pytest.mark.parametrize("L,R", [(5, 9), (8, 8), (13, 4), (1, 3), (6, 1)])
def test_skew_matches_naive_on_and_below_diagonal(L: int, R: int):
    torch.manual_seed(0)
    q, e = torch.randn(B, H, L, DH), torch.randn(H, R, DH)
    naive, skew = relative_logits_naive(q, e), relative_logits_skew(q, e)
    assert skew.shape == (B, H, L, L)
    low = _lower(L)
    torch.testing.assert_close(skew[..., low], naive[..., low], atol=1e-5, rtol=1e-5)
    if L > R:  # the table is shorter than the sequence: far distances contribute exactly zero
        far = torch.ones(L, L, dtype=torch.bool).tril(-R)
        assert far.any() and skew[..., far].abs().max() == 0


@pytest.mark.parametrize(
    "k_len,q_pos",
    [(10, [9]), (10, [7, 8, 9]), (20, [19]), (20, [0]), (20, [3, 11, 19]), (5, [0, 1, 2, 3, 4])],
)
def test_gather_matches_naive_rows(k_len: int, q_pos: list[int]):
    torch.manual_seed(0)
    R = 6
    q_full, e = torch.randn(B, H, k_len, DH), torch.randn(H, R, DH)
    pos = torch.tensor(q_pos)
    naive = relative_logits_naive(q_full, e)  # (B, H, k_len, k_len)
    got = relative_logits_gather(q_full[:, :, pos], e, pos, k_len)
    torch.testing.assert_close(got, naive[:, :, pos], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Module


def test_module_skew_matches_naive():
    skew = _module("skew", R=6)
    naive = _module("naive", R=6)
    naive.load_state_dict(skew.state_dict())
    assert skew.rel_emb.abs().min() > 0  # the relative term is genuinely in play
    x = torch.randn(B, 20, 24)
    with torch.no_grad():
        torch.testing.assert_close(skew(x)[0], naive(x)[0], atol=1e-5, rtol=1e-5)


def test_relative_term_matters():
    m = _module()
    x = torch.randn(B, 12, 24)
    with torch.no_grad():
        y0 = m(x)[0]
        m.rel_emb.add_(torch.randn_like(m.rel_emb))
        y1 = m(x)[0]
    assert (y0 - y1).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["skew", "naive"])
def test_causal(impl: str):
    m = _module(impl)
    T, j = 12, 7
    x = torch.randn(B, T, 24)
    x2 = x.clone()
    x2[:, j] += 1.0
    with torch.no_grad():
        y, y2 = m(x)[0], m(x2)[0]
    torch.testing.assert_close(y[:, :j], y2[:, :j], atol=1e-6, rtol=0)
    assert (y[:, j:] - y2[:, j:]).abs().max() > 1e-4


@pytest.mark.parametrize("prefill", [0, 10])
def test_kv_cache_matches_full_forward(prefill: int):
    # R=16 < 64 so later steps exercise the zero-beyond-R region of the cache.
    m = _module("skew", R=16)
    T = 64
    x = torch.randn(B, T, 24)
    with torch.no_grad():
        full, _ = m(x)
        past = None
        outs = []
        if prefill:
            y, past = m(x[:, :prefill], use_cache=True)
            outs.append(y)
            assert past[0].shape == (B, 3, prefill, 8)
        for t in range(prefill, T):
            y, past = m(x[:, t : t + 1], past_kv=past, use_cache=True)
            outs.append(y)
        assert past[0].shape == (B, 3, T, 8) and past[1].shape == (B, 3, T, 8)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_chunks_and_no_cache_return():
    m = _module("skew", R=5)
    x = torch.randn(B, 30, 24)
    with torch.no_grad():
        full, none = m(x)
        assert none is None
        y0, past = m(x[:, :11], use_cache=True)
        y1, past = m(x[:, 11:20], past_kv=past, use_cache=True)  # a multi-token chunk
        y2, nothing = m(x[:, 20:], past_kv=past)  # last chunk without asking for the cache
    assert nothing is None
    torch.testing.assert_close(torch.cat([y0, y1, y2], 1), full, atol=1e-5, rtol=1e-5)


def test_gradients_reach_rel_emb_through_skew():
    m = _module("skew").train()
    x = torch.randn(B, 10, 24, requires_grad=True)
    m(x)[0].square().sum().backward()
    assert m.rel_emb.grad is not None and m.rel_emb.grad.abs().max() > 0
    for p in (m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.o_proj.weight, x):
        assert p.grad is not None and p.grad.abs().max() > 0


def test_attention_dropout_only_in_training():
    m = _module("skew", dropout=0.5)
    x = torch.randn(B, 10, 24)
    with torch.no_grad():
        assert torch.equal(m(x)[0], m(x)[0])  # eval: deterministic
        m.train()
        torch.manual_seed(1)
        a = m(x)[0]
        torch.manual_seed(2)
        assert not torch.allclose(a, m(x)[0])


def test_rel_emb_is_a_saved_parameter():
    m = _module(R=16)
    assert m.rel_emb.shape == (3, 16, 8)
    assert "rel_emb" in m.state_dict()
    assert any(p is m.rel_emb for p in m.parameters())
    names = {n for n, _ in m.named_parameters()}
    assert {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"} <= names


def test_bad_arguments():
    with pytest.raises(ValueError):
        RelativeSelfAttention(25, 3, 8)
    with pytest.raises(ValueError):
        RelativeSelfAttention(24, 3, 8, impl="fast")


def test_auto_is_skew_on_cpu():
    a, s = _module("auto"), _module("skew")
    x = torch.randn(B, 9, 24)
    with torch.no_grad():
        assert torch.equal(a(x)[0], s(x)[0])


# ------------------------------------------------------------------------------------------------
# FlexAttention


@pytest.mark.skipif(not HAS_FLEX, reason="torch has no flex_attention")
@pytest.mark.parametrize("R", [8, 40])
def test_flex_cpu_forward_matches_skew(R: int):
    # Flex has no backward on CPU, but its eager forward runs under no_grad.
    flex, skew = _module("flex", R=R), _module("skew", R=R)
    x = torch.randn(B, 33, 24)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        try:
            got = flex(x)[0]
        except (NotImplementedError, RuntimeError) as e:  # pragma: no cover
            pytest.skip(f"flex forward does not run on CPU in this torch: {e}")
        want = skew(x)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_FLEX, reason="torch has no flex_attention")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_flex_cuda_forward_backward_matches_skew(dtype: torch.dtype, tol: float):
    flex = _module("flex", R=48, d_model=128, n_heads=4).cuda().to(dtype).train()
    skew = _module("skew", R=48, d_model=128, n_heads=4).cuda().to(dtype).train()
    skew.load_state_dict(flex.state_dict())
    torch.manual_seed(0)
    x = torch.randn(2, 256, 128, device="cuda", dtype=dtype)
    g = torch.randn_like(x)
    y_flex, y_skew = flex(x)[0], skew(x)[0]
    (y_flex * g).sum().backward()
    (y_skew * g).sum().backward()
    torch.testing.assert_close(y_flex.float(), y_skew.float(), atol=tol, rtol=tol)
    for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "rel_emb"):
        gf = dict(flex.named_parameters())[name].grad
        gs = dict(skew.named_parameters())[name].grad
        assert gf is not None and gf.abs().max() > 0, name
        scale = gs.float().abs().max().clamp_min(1.0)
        torch.testing.assert_close(gf.float() / scale, gs.float() / scale, atol=tol, rtol=tol)


def test_sdpa_baseline_is_skew_without_the_relative_term():
    """The benchmark's plain baseline must be the same attention minus S_rel, cached or not."""
    skew = _module("skew")
    with torch.no_grad():
        skew.rel_emb.zero_()
    base = _module("sdpa")
    base.load_state_dict(skew.state_dict())
    x = torch.randn(2, 12, 24)
    assert torch.allclose(skew(x)[0], base(x)[0], atol=1e-5)
    y_full, _ = base(x)
    _, past = base(x[:, :5], use_cache=True)
    y_step, _ = base(x[:, 5:6], past_kv=past)
    assert torch.allclose(y_step[:, 0], y_full[:, 5], atol=1e-5)


def test_auto_falls_back_to_skew_once_when_flex_cannot_run(monkeypatch, capsys) -> None:
    import mehldau.nn.relative_attention as ra

    torch.manual_seed(0)
    attn = ra.RelativeSelfAttention(16, 2, 8, impl="auto").eval()
    skew = ra.RelativeSelfAttention(16, 2, 8, impl="skew").eval()
    skew.load_state_dict(attn.state_dict())
    x = torch.randn(2, 12, 16)
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no Triton for this GPU\nmore lines")

    monkeypatch.setattr(ra, "_FLEX_FAILURE", None)
    monkeypatch.setattr(ra, "_flex_relative_attention", broken)
    monkeypatch.setattr(ra, "HAS_FLEX", True)
    monkeypatch.setattr(ra, "_fused_device", lambda x: True)  # as on a GPU: auto picks flex
    with torch.no_grad():
        first, _ = attn(x)
        second, _ = attn(x)
    monkeypatch.undo()
    with torch.no_grad():
        expected, _ = skew(x)
    assert torch.allclose(first, expected, atol=1e-6) and torch.allclose(second, expected)
    assert len(calls) == 1  # tried once, then skew directly
    err = capsys.readouterr().err
    assert err.count("FlexAttention path failed") == 1 and "no Triton for this GPU" in err
    with pytest.raises(RuntimeError):  # an explicit impl='flex' is not silently replaced
        explicit = ra.RelativeSelfAttention(16, 2, 8, impl="flex").eval()
        monkeypatch.setattr(ra, "_flex_relative_attention", broken)
        explicit(x)
