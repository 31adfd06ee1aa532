"""Gaussian diffusion on latents: DDPM training (Ho et al. 2020, arXiv 2006.11239), DDIM
sampling (Song et al. 2020, arXiv 2010.02502) and DPM-Solver++(2M) (Lu et al. 2022, arXiv
2211.01095), deterministic or its SDE variant.

Conventions: t indexes the schedule's steps 0..T-1 (t = 0 is the least noisy); x_t =
sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; the model predicts eps (the reference's objective:
eps-prediction, MSE, linear betas, T = 1000). A *denoiser* is any callable `(x_t, t) -> eps`
with t a (B,) long tensor; `conditional` turns a label-conditioned model into one, with
classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) in one batched call.

DDIM with eta = 1 is the ancestral DDPM sampler with the posterior ("fixed small") variance;
the reference's DDPM tables use the "fixed large" variance beta_t, which only differs there.
Randomness: `ddim_sample` draws x_T from `generator` first, then one normal tensor of the
sample's shape per step whose sigma is > 0 (none when eta = 0, and none on the last step,
whose sigma is always 0), so a seed fixes the whole trajectory.

Solvers (`Solver`, `SOLVERS`): every reverse step t -> t_prev is a Gaussian N(mean, sigma^2 I)
given eps(x_t, t), so one sampling loop (`sample`) and SCG serve them all. `ddim` (eta);
`dpmpp_2m`: DPM-Solver++'s multistep second-order update of the data prediction x0 (the
probability-flow ODE, sigma = 0: fewer steps for the same error); `dpmpp_2m_sde`: its SDE
variant, whose first-order step *is* DDIM with eta = 1 (same mean, same sigma), plus the
second-order correction from the previous step's x0. Both take first-order steps at the start
and on the last step (to t = -1, where the log-SNR is infinite), as the paper's solver does.
They draw noise exactly as DDIM does (one tensor per step whose sigma > 0).

Inpainting (RePaint, Lugmayr et al. 2022, arXiv 2201.09865, without its resampling jumps):
`Inpaint` holds known clean latents on some time rows; after every step those rows of
x_{t_prev} are replaced by the known latents forward-noised to t_prev (q(x_{t_prev} | x_0)),
so the model denoises the rest in their context, and at the end they are the known latents
exactly. With rows held, each step draws one more normal tensor (after the step's own);
with none held it draws nothing, so the sampler is then the plain one, draw for draw.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mehldau import jobs

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x_t (B, ...), t (B,) long) -> eps (B, ...)
# (x_t, t, t_prev) -> (x_{t_prev}, x0_pred), or None to let the sampler take its own step.
StepHook = Callable[[Tensor, int, int], "tuple[Tensor, Tensor] | None"]


class NoiseSchedule:
    """Betas and cumulative alphas for `steps` diffusion steps, stored in float64 on the CPU
    (indexed with Python ints while sampling; `q_sample` moves what it gathers)."""

    def __init__(self, kind: str = "linear", steps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02, cosine_s: float = 0.008) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if kind == "linear":
            # Scaled so any number of steps spans the same noise range as 1000 (improved-DDPM's
            # convention); at steps=1000 these are Ho et al.'s 1e-4 .. 0.02.
            scale = 1000 / steps
            betas = torch.linspace(scale * beta_start, scale * beta_end, steps, dtype=torch.float64)
        elif kind == "cosine":  # Nichol & Dhariwal 2021, arXiv 2102.09672, eq. 17
            f = torch.cos((torch.arange(steps + 1, dtype=torch.float64) / steps + cosine_s)
                          / (1 + cosine_s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)  # the clip keeps the end finite
        else:
            raise ValueError(f"kind must be linear or cosine, got {kind}")
        if not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must lie in (0, 1)")
        self.kind, self.steps = kind, steps
        self.betas = betas  # (T,)
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # (T,): abar_t

    def abar(self, t: int) -> float:
        """abar_t, with abar_{-1} = 1 (the clean end of the chain)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Closed-form q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t (B,) long."""
        a = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype)  # (B,)
        a = a.view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, ...)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` timesteps from T-1 down to 0, evenly spaced (both ends included)."""
        if not 1 <= steps <= self.steps:
            raise ValueError(f"steps must be in [1, {self.steps}], got {steps}")
        if steps == 1:
            return [self.steps - 1]
        ts = torch.linspace(self.steps - 1, 0, steps, dtype=torch.float64).round().long()
        return ts.tolist()

    def logsnr_timesteps(self, steps: int) -> list[int]:
        """`steps` timesteps from T-1 down to 0, evenly spaced in log-SNR (DPM-Solver's
        spacing for few steps: the step lengths its error bounds are stated in) and rounded;
        where rounding would repeat a timestep (the low-noise end), they move apart to stay
        distinct (steps = T gives every timestep)."""
        if not 1 <= steps <= self.steps:
            raise ValueError(f"steps must be in [1, {self.steps}], got {steps}")
        a = self.alphas_cumprod
        lam = 0.5 * torch.log(a / (1 - a))  # (T,), decreasing in t
        want = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
        ts = [int((lam - w).abs().argmin()) for w in want]
        for k in range(steps - 2, -1, -1):  # from the clean end up: strictly decreasing
            ts[k] = max(ts[k], ts[k + 1] + 1)
        ts[0] = min(ts[0], self.steps - 1)
        for k in range(1, steps):  # and from the noisy end down, inside 0..T-1
            ts[k] = min(ts[k], ts[k - 1] - 1)
        return ts

    def ddim_mean_std(self, x_t: Tensor, eps: Tensor, t: int, t_prev: int, eta: float
                      ) -> tuple[Tensor, float, Tensor]:
        """DDIM's p(x_{t_prev} | x_t) = N(mean, sigma^2 I) (arXiv 2010.02502 eq. 12, 16), and the
        Tweedie/eps estimate x0_pred. t_prev = -1 is the final step to x_0 (sigma = 0)."""
        a, a_prev = self.abar(t), self.abar(t_prev)
        x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        mean = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        return mean, sigma, x0

    def ddim_step(self, x_t: Tensor, eps: Tensor, t: int, t_prev: int, eta: float = 0.0,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One DDIM step -> (x_{t_prev}, x0_pred). Draws noise only when sigma > 0."""
        mean, sigma, x0 = self.ddim_mean_std(x_t, eps, t, t_prev, eta)
        if sigma == 0.0:
            return mean, x0
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return mean + sigma * noise, x0


SOLVERS = ("ddim", "dpmpp_2m", "dpmpp_2m_sde")
SPACINGS = ("uniform", "logsnr")  # timesteps even in t (`ddim_timesteps`) or in log-SNR


class Solver:
    """The reverse-step rule of one sampling run: `ddim` with `eta`, `dpmpp_2m` (ODE) or
    `dpmpp_2m_sde`. The DPM-Solver++ ones are multistep: each step remembers its x0 (data
    prediction) for the next step's second-order term, so use a fresh Solver (or `reset`) per
    trajectory; a step that does not continue the last one (a new run from T-1) starts over at
    first order."""

    def __init__(self, schedule: NoiseSchedule, name: str = "ddim", eta: float = 0.0,
                 spacing: str = "uniform") -> None:
        if name not in SOLVERS:
            raise ValueError(f"unknown solver '{name}'; choose from {', '.join(SOLVERS)}")
        if spacing not in SPACINGS:
            raise ValueError(f"unknown spacing '{spacing}'; choose from {', '.join(SPACINGS)}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.schedule, self.name, self.eta, self.spacing = schedule, name, eta, spacing
        self.reset()

    def timesteps(self, steps: int) -> list[int]:
        if self.spacing == "logsnr":
            return self.schedule.logsnr_timesteps(steps)
        return self.schedule.ddim_timesteps(steps)

    def reset(self) -> None:
        self._last: tuple[Tensor, int, int] | None = None  # (x0, t, t_prev) of the last step

    @property
    def stochastic(self) -> bool:
        """Whether a step (other than the last) draws noise: what SCG chooses among."""
        return self.name == "dpmpp_2m_sde" or (self.name == "ddim" and self.eta > 0)

    def _lambda(self, t: int) -> float:  # log-SNR: log(alpha_t / sigma_t)
        a = self.schedule.abar(t)
        return 0.5 * math.log(a / (1 - a))

    def mean_std(self, x_t: Tensor, eps: Tensor, t: int, t_prev: int
                 ) -> tuple[Tensor, float, Tensor]:
        """p(x_{t_prev} | x_t) = N(mean, sigma^2 I) and x0_pred, from eps = eps(x_t, t). Call
        once per step, in order: the multistep solvers record this step's x0."""
        if self.name == "ddim":
            return self.schedule.ddim_mean_std(x_t, eps, t, t_prev, self.eta)
        a = self.schedule.abar(t)
        x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
        last, self._last = self._last, (x0, t, t_prev)
        if t_prev < 0:  # the last step, first order: x_{-1} = x0 (both solvers)
            return x0, 0.0, x0
        a_prev = self.schedule.abar(t_prev)
        alpha_p, sigma_p, sigma_t = math.sqrt(a_prev), math.sqrt(1 - a_prev), math.sqrt(1 - a)
        h = self._lambda(t_prev) - self._lambda(t)
        d = x0  # first order; second order (paper's Alg. 2, midpoint): x0 + (x0 - x0_last) / 2r
        if last is not None and last[2] == t and t_prev > 0:
            r = (self._lambda(t) - self._lambda(last[1])) / h
            d = x0 + (x0 - last[0]) / (2 * r)
        if self.name == "dpmpp_2m":
            return sigma_p / sigma_t * x_t - alpha_p * math.expm1(-h) * d, 0.0, x0
        # SDE-DPM-Solver++(2M): sigma_p^2 (1 - e^{-2h}) is DDIM eta = 1's variance
        mean = sigma_p / sigma_t * math.exp(-h) * x_t - alpha_p * math.expm1(-2 * h) * d
        return mean, sigma_p * math.sqrt(-math.expm1(-2 * h)), x0

    def step(self, x_t: Tensor, eps: Tensor, t: int, t_prev: int,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One step -> (x_{t_prev}, x0_pred). Draws noise only when sigma > 0."""
        mean, sigma, x0 = self.mean_std(x_t, eps, t, t_prev)
        if sigma == 0.0:
            return mean, x0
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return mean + sigma * noise, x0


class Inpaint:
    """Known clean latents `known` (B or 1, C, T, ...) held on the time rows where `rows`
    (T,) bool is True (dimension 2 of the latent); the other rows are sampled."""

    def __init__(self, known: Tensor, rows: Tensor) -> None:
        if rows.dim() != 1 or rows.numel() != known.size(2):
            raise ValueError(f"rows must be ({known.size(2)},) bool, got {tuple(rows.shape)}")
        self.known = known
        self.rows = rows.bool().to(known.device)
        self.mask = self.rows.view(1, 1, -1, *([1] * (known.dim() - 3)))

    @property
    def active(self) -> bool:
        return bool(self.rows.any())

    def hold(self, x: Tensor, schedule: NoiseSchedule, t: int,
             generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """x (N, ...) with the held rows set to q(x_t | known) (t = -1: the known latents
        themselves). N may be k * B (candidate-major): the known latents and `noise` (drawn
        here as (B, ...) when not given) are tiled, so every candidate of a sample holds the
        same rows."""
        if not self.active:
            return x
        known = self.known.to(x.dtype)
        if t >= 0:
            if noise is None:
                noise = torch.randn(known.shape, generator=generator, device=x.device,
                                    dtype=x.dtype)
            a = schedule.abar(t)
            known = math.sqrt(a) * known + math.sqrt(1 - a) * noise
        reps = x.size(0) // known.size(0)
        known = known.repeat(reps, *([1] * (known.dim() - 1)))
        return torch.where(self.mask, known, x)


def ddpm_loss(model: Callable[..., Tensor], schedule: NoiseSchedule, x0: Tensor,
              cond: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Ho et al.'s simple loss: MSE between eps and model(x_t, t[, cond]), t ~ U{0..T-1}.
    Label dropout for classifier-free guidance is the model's job (DiT does it in training)."""
    B = x0.size(0)
    t = torch.randint(0, schedule.steps, (B,), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.q_sample(x0, t, noise)
    eps = model(x_t, t) if cond is None else model(x_t, t, cond)
    return F.mse_loss(eps, noise)


def conditional(model: Callable[..., Tensor], y: Tensor, scale: float = 1.0,
                null_label: int | None = None) -> Denoiser:
    """A denoiser from model(x, t, y) with labels y (B,). A batch that is k * B long (SCG's
    candidates, candidate-major) gets y tiled k times. scale != 1 applies classifier-free
    guidance eps_u + scale (eps_c - eps_u), conditional and null label in one model call."""
    if scale != 1.0 and null_label is None:
        raise ValueError("classifier-free guidance needs null_label")

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        yy = y.repeat(x.size(0) // y.size(0))  # (N,)
        if scale == 1.0:
            return model(x, t, yy)
        eps_c, eps_u = model(torch.cat([x, x]), torch.cat([t, t]),
                             torch.cat([yy, torch.full_like(yy, null_label)])).chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return denoise


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, schedule: NoiseSchedule, shape: tuple[int, ...],
                steps: int = 50, eta: float = 0.0, generator: torch.Generator | None = None,
                x_T: Tensor | None = None, device: torch.device | str | None = None,
                step_hook: StepHook | None = None, inpaint: Inpaint | None = None) -> Tensor:
    """Sample x_0 of `shape` in `steps` DDIM steps (steps = T and eta = 1: ancestral DDPM);
    `sample` with `Solver(schedule, "ddim", eta)`."""
    return sample(denoiser, Solver(schedule, "ddim", eta), shape, steps, generator, x_T, device,
                  step_hook, inpaint)


@torch.no_grad()
def sample(denoiser: Denoiser, solver: Solver, shape: tuple[int, ...], steps: int = 50,
           generator: torch.Generator | None = None, x_T: Tensor | None = None,
           device: torch.device | str | None = None, step_hook: StepHook | None = None,
           inpaint: Inpaint | None = None) -> Tensor:
    """Sample x_0 of `shape` in `steps` steps of `solver`, at its `timesteps(steps)`.

    x_T is drawn from `generator` unless given. `step_hook(x_t, t, t_prev)` may take any step
    itself (SCG does) by returning (x_{t_prev}, x0_pred); returning None runs the plain step.
    `inpaint`: rows held to known latents (see `Inpaint`); a hook that takes a step must
    hold them itself (its x_{t_prev} is used as returned).
    """
    schedule = solver.schedule
    solver.reset()
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T
    ts = solver.timesteps(steps)
    if inpaint is not None:
        x = inpaint.hold(x, schedule, ts[0], generator)
    for k, (t, t_prev) in enumerate(zip(ts, ts[1:] + [-1])):
        jobs.step(k / len(ts), "denoise")
        out = step_hook(x, t, t_prev) if step_hook is not None else None
        if out is None:
            eps = denoiser(x, torch.full((x.size(0),), t, dtype=torch.long, device=x.device))
            out = solver.step(x, eps, t, t_prev, generator)
            if inpaint is not None:
                out = (inpaint.hold(out[0], schedule, t_prev, generator), out[1])
        x = out[0]
    return x
