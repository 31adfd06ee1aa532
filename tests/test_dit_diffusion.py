"""Diffusion schedule, q_sample, DDPM loss and DDIM sampling; DiT shapes and adaLN-Zero init."""

from __future__ import annotations

import math

import pytest
import torch

from mehldau.nn.diffusion import (
    NoiseSchedule,
    Solver,
    conditional,
    ddim_sample,
    ddpm_loss,
    sample,
)
from mehldau.nn.dit import DiT, DiTConfig

TINY_DIT = dict(in_channels=4, patch_size=(2, 2), hidden_size=32, depth=2, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_alphas_cumprod_is_product_of_one_minus_beta(kind):
    s = NoiseSchedule(kind)
    ts = (0, 9, 499, 999)
    prod = [math.prod(1 - b for b in s.betas[: t + 1].tolist()) for t in ts]  # plain floats
    assert torch.allclose(s.alphas_cumprod[list(ts)], torch.tensor(prod, dtype=torch.float64),
                          rtol=1e-9)
    assert (s.alphas_cumprod.diff() < 0).all() and s.alphas_cumprod[-1] < 1e-3
    if kind == "linear":
        assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    with pytest.raises(ValueError):
        NoiseSchedule("sigmoid")


def test_q_sample_matches_closed_form_moments():
    s = NoiseSchedule("linear")
    x0 = torch.tensor([2.0, -1.0, 0.5])
    n = 20000
    for t in (0, 100, 500, 999):
        noise = torch.randn(n, 3, generator=gen(t))
        xt = s.q_sample(x0.expand(n, 3), torch.full((n,), t), noise)  # (n, 3)
        a = float(s.alphas_cumprod[t])
        # Standard errors: sqrt((1-a)/n) <= 0.007 for the mean, ~1% relative for the variance.
        assert torch.allclose(xt.mean(0), math.sqrt(a) * x0, atol=0.03)
        assert torch.allclose(xt.var(0), torch.full((3,), 1 - a), rtol=0.05, atol=1e-5)


def test_ddpm_loss_is_zero_for_the_exact_denoiser():
    # Data = one point c: the exact eps is (x_t - sqrt(abar) c) / sqrt(1 - abar).
    s = NoiseSchedule("linear")
    c = torch.randn(1, 4, 8, 6, generator=gen(0))

    def exact(x, t):
        a = s.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return (x - a.sqrt() * c) / (1 - a).sqrt()

    x0 = c.expand(16, -1, -1, -1)
    assert ddpm_loss(exact, s, x0, generator=gen(1)) < 1e-6
    assert ddpm_loss(lambda x, t: torch.zeros_like(x), s, x0, generator=gen(1)) > 0.8


def test_ddim_timesteps():
    s = NoiseSchedule(steps=1000)
    ts = s.ddim_timesteps(50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert s.ddim_timesteps(1000) == list(range(999, -1, -1))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_recovers_a_point_mass_with_the_exact_denoiser(eta):
    s = NoiseSchedule("cosine")
    c = torch.randn(1, 4, 8, 6, generator=gen(0))

    def exact(x, t):
        a = s.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return (x - a.sqrt() * c) / (1 - a).sqrt()

    x = ddim_sample(exact, s, (3, 4, 8, 6), steps=20, eta=eta, generator=gen(1))
    assert torch.allclose(x, c.expand_as(x), atol=1e-3)


def _toy_denoiser(x, t):  # a smooth, nonlinear stand-in for a trained net
    return torch.tanh(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000)


def test_ddim_eta0_deterministic_eta1_depends_on_seed():
    s = NoiseSchedule()
    x_T = torch.randn(2, 4, 8, 6, generator=gen(0))
    a = ddim_sample(_toy_denoiser, s, x_T.shape, 10, eta=0.0, generator=gen(1), x_T=x_T)
    b = ddim_sample(_toy_denoiser, s, x_T.shape, 10, eta=0.0, generator=gen(2), x_T=x_T)
    assert torch.equal(a, b)
    c = ddim_sample(_toy_denoiser, s, x_T.shape, 10, eta=1.0, generator=gen(1), x_T=x_T)
    d = ddim_sample(_toy_denoiser, s, x_T.shape, 10, eta=1.0, generator=gen(1), x_T=x_T)
    e = ddim_sample(_toy_denoiser, s, x_T.shape, 10, eta=1.0, generator=gen(2), x_T=x_T)
    assert torch.equal(c, d) and (c - e).abs().max() > 0.1 and (c - a).abs().max() > 0.1


def test_step_hook_replaces_steps():
    s = NoiseSchedule()
    seen = []

    def hook(x, t, t_prev):
        seen.append((t, t_prev))
        return (torch.zeros_like(x), torch.zeros_like(x)) if t_prev == -1 else None

    x = ddim_sample(_toy_denoiser, s, (1, 4, 8, 6), 5, generator=gen(0), step_hook=hook)
    assert seen == [(999, 749), (749, 500), (500, 250), (250, 0), (0, -1)]
    assert torch.equal(x, torch.zeros_like(x))


MU, SD = 1.5, 0.5  # data ~ N(MU, SD^2) per element: the exact eps is known in closed form


def _gaussian_eps(s: NoiseSchedule):
    def eps(x, t):
        a = s.alphas_cumprod[t].float().view(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * SD**2 + 1 - a)
    return eps


def test_dpmpp_2m_follows_the_exact_ode_closer_than_ddim():
    # For Gaussian data the probability-flow ODE keeps each point's z-score, so x_T maps to
    # MU + SD * (x_T - sqrt(abar_T) MU) / sqrt(var_T) exactly. DDIM (eta = 0) is DPM-Solver's
    # first order; the second-order multistep term must cut its error many times over.
    s = NoiseSchedule()
    x_T = torch.randn(4000, 1, generator=gen(0))
    a = s.abar(999)
    exact = MU + SD * (x_T - math.sqrt(a) * MU) / math.sqrt(a * SD**2 + 1 - a)
    err = {name: float((sample(_gaussian_eps(s), Solver(s, name), x_T.shape, 50, x_T=x_T)
                        - exact).abs().max()) for name in ("ddim", "dpmpp_2m")}
    assert err["dpmpp_2m"] < 0.02 and err["dpmpp_2m"] < err["ddim"] / 5, err  # 0.006 vs 0.12


def test_logsnr_spacing_cuts_dpmpp_2m_error_at_few_steps():
    # The linear schedule's last uniform step (t 111 -> 0 of 10) spans most of the log-SNR
    # range; even log-SNR steps are what the solver's error is small in.
    s = NoiseSchedule()
    x_T = torch.randn(4000, 1, generator=gen(0))
    a = s.abar(999)
    exact = MU + SD * (x_T - math.sqrt(a) * MU) / math.sqrt(a * SD**2 + 1 - a)
    err = {sp: float((sample(_gaussian_eps(s), Solver(s, "dpmpp_2m", spacing=sp), x_T.shape, 10,
                             x_T=x_T) - exact).abs().max()) for sp in ("uniform", "logsnr")}
    assert err["logsnr"] < 0.05 and err["logsnr"] < err["uniform"] / 5, err  # 0.03 vs 0.47
    for steps in (1, 2, 10, 50, 1000):
        ts = s.logsnr_timesteps(steps)
        assert len(ts) == steps and ts[0] == 999 and all(a > b for a, b in zip(ts, ts[1:]))
        assert steps == 1 or ts[-1] == 0


def test_dpmpp_2m_sde_reaches_the_data_distribution_where_ddim_eta1_does_not():
    s = NoiseSchedule()
    stats = {}
    for name, eta in (("dpmpp_2m_sde", 0.0), ("ddim", 1.0)):
        x = sample(_gaussian_eps(s), Solver(s, name, eta), (20000, 1), 50, gen(1))
        stats[name] = float(x.mean()), float(x.std())
    mean, std = stats["dpmpp_2m_sde"]
    assert abs(mean - MU) < 0.01 and abs(std - SD) < 0.025, stats  # 1.497, 0.511
    assert abs(stats["ddim"][1] - SD) > 0.04, stats  # 50 first-order steps shrink it: 0.44


def test_dpmpp_2m_sde_first_order_step_is_ddim_eta1():
    # With 2 steps (999 -> 0 -> clean) both steps are first order: DDIM eta = 1, draw for
    # draw. With more, the second-order term must change the result.
    s = NoiseSchedule()
    sde, ddim = Solver(s, "dpmpp_2m_sde"), Solver(s, "ddim", 1.0)
    for steps, same in ((2, True), (10, False)):
        a = sample(_toy_denoiser, sde, (2, 4, 8, 6), steps, gen(3))
        b = sample(_toy_denoiser, ddim, (2, 4, 8, 6), steps, gen(3))
        assert torch.allclose(a, b, atol=1e-5) == same
    assert sde.stochastic and ddim.stochastic and not Solver(s, "dpmpp_2m").stochastic
    with pytest.raises(ValueError):
        Solver(s, "euler")


def test_dit_adaln_zero_init():
    torch.manual_seed(0)
    m = DiT(DiTConfig(num_classes=3, **TINY_DIT))
    x, t, y = torch.randn(2, 4, 8, 6), torch.tensor([3, 900]), torch.tensor([0, 2])
    tokens, c = m.embed(x), m.condition(t, y)
    h = tokens
    for block in m.blocks:
        h = block(h, c)
    assert torch.equal(h, tokens)  # every block starts as the identity
    assert torch.equal(m(x, t, y), torch.zeros_like(x))  # and the output layer at zero
    # One optimiser step on the DDPM loss leaves that state: the zeros do get gradients.
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ddpm_loss(m, NoiseSchedule(), x, cond=y).backward()
    opt.step()
    assert m(x, t, y).abs().max() > 0


@pytest.mark.parametrize("num_classes", [0, 3])
def test_dit_output_shape(num_classes):
    torch.manual_seed(0)
    m = DiT(DiTConfig(num_classes=num_classes, **TINY_DIT))
    for layer in [m.final.linear] + [b.adaLN_modulation[-1] for b in m.blocks]:
        torch.nn.init.normal_(layer.weight, std=0.1)  # leave the all-zero init
    x, t = torch.randn(3, 4, 16, 12), torch.tensor([0, 10, 999])
    out = m(x, t)  # no labels: the null label when conditional
    assert out.shape == x.shape and out.abs().max() > 0
    if num_classes:
        out_y = m(x, t, torch.tensor([0, 1, 2]))
        assert out_y.shape == x.shape and not torch.allclose(out, out_y)
        m.eval()
        guided = conditional(m, torch.tensor([0, 1, 2]), scale=3.0, null_label=3)(x, t)
        assert torch.allclose(guided, m(x, t) + 3.0 * (m(x, t, torch.tensor([0, 1, 2])) - m(x, t)),
                              atol=1e-5)
    else:
        with pytest.raises(ValueError):
            m(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        m(torch.randn(1, 4, 15, 12), t[:1])  # 15 not divisible by the patch's 2


def test_dit_default_tokens_for_a_reference_latent():
    cfg = DiTConfig()  # patch (1, 6): a 4 x 128 x 12 latent (10.24 s) gives 256 tokens
    m = DiT(DiTConfig(**{**cfg.to_dict(), "hidden_size": 32, "depth": 1, "num_heads": 2}))
    assert m.embed(torch.randn(1, 4, 128, 12)).shape == (1, 256, 32)
    with pytest.raises(ValueError):
        DiTConfig(hidden_size=30, num_heads=4)


def test_dit_runs_in_bf16_weights_without_autocast():
    # Sampling casts the whole model (benchmarks, GPU); the fp32 timestep sinusoids must follow.
    torch.manual_seed(0)
    dit = DiT(DiTConfig(**TINY_DIT)).to(torch.bfloat16)
    eps = dit(torch.randn(2, 4, 8, 6, dtype=torch.bfloat16), torch.tensor([3, 700]))
    assert eps.dtype == torch.bfloat16 and eps.shape == (2, 4, 8, 6) and eps.isfinite().all()
