"""Stochastic Control Guidance (SCG; Huang et al., ICML 2024, arXiv 2402.14285): steer a latent
diffusion sampler toward a non-differentiable rule by choosing among its own random steps.

At each guided reverse step t -> t_prev of a stochastic sampler (DDIM with eta > 0, or
SDE-DPM-Solver++(2M), `mehldau.nn.diffusion.Solver`):
  1. from the unguided eps(x_t, t) take the step's mean mu and std sigma;
  2. draw n candidates x_prev^i = mu + sigma eps_i, eps_i ~ N(0, I);
  3. predict each candidate's clean latent x0^i (Tweedie, from one batched denoiser call over
     all n x B candidates) and decode all of them in one batched decoder call;
  4. score the rolls with `loss_fn` and keep, per sample, the candidate with the lowest loss.
Every candidate is a legal sample of the unguided step, so the result stays on the model's
manifold; strength comes from n, the guidance window and the rule weights; no gradients.

Differences from the reference code (`scg_sample` in `guided_diffusion/gaussian_diffusion.py`):
- candidates for x_{t_prev} are scored with the denoiser at t_prev, their own noise level (the
  reference uses t). The winner's eps is then exactly what the next step needs, so a guided
  step costs one denoiser call (batch n*B) instead of two;
- the sampler is DDIM with eta > 0 (eta = 1 with all T steps is DDPM with the posterior
  variance; the reference's tables use DDPM's "fixed large" variance);
- the last step (t_prev = -1) has sigma = 0, so all candidates coincide: it is not guided;
- `solver=dpmpp_2m_sde` draws the candidates around DPM-Solver++'s second-order mean with the
  same sigma as DDIM eta = 1 (its first-order step is that DDIM step); the step's x0, from
  which the next step's second-order term comes, is x_t's, shared by all candidates. The
  deterministic `dpmpp_2m` has nothing to choose among and is refused.
Hand-written because no library implements SCG; it needs only a denoiser, a decoder and a loss.

Seeds: `generator` first draws x_T (B, ...), then each step draws its noise in step order:
(n, B, ...) at a guided step, (B, ...) at an unguided one, nothing when sigma = 0. So n = 1
reproduces plain `ddim_sample` with the same generator exactly, and guidance off (`loss_fn`
None) *is* `ddim_sample`. With n > 1 the same seed gives the same x_T; the streams part after
the first guided step. Candidates are candidate-major: row i*B + b is candidate i of sample b
(`mehldau.nn.diffusion.conditional` tiles labels to match).

Inpainting (`mehldau.nn.diffusion.Inpaint`, prompt continuation): every candidate holds the
known rows, noised with one draw (B, ...) shared by a sample's candidates and made after the
candidates' noise, so the candidates differ only where the sample is free; they are scored on
their x0 with the held rows set to the known latents (what the output will hold there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mehldau.nn.diffusion import SOLVERS, SPACINGS, Denoiser, Inpaint, NoiseSchedule, Solver, sample

Decode = Callable[[Tensor], Tensor]  # latents (N, C, H, W) -> rolls (N, 2, T, 88)
LossFn = Callable[[Tensor], Tensor]  # rolls (N, 2, T, 88) -> (N,), lower is better


@dataclass
class SCGConfig:
    candidates: int = 16  # n: the reference's tables use 16, ablations 4 and 8
    t_start: int = 750  # guide only while t_end <= t <= t_start (schedule steps, 0 = clean)
    t_end: int = 0
    every: int = 1  # guide every k-th step inside the window (the reference's interval)
    eta: float = 1.0  # DDIM eta: SCG needs a stochastic step
    solver: str = "ddim"  # or dpmpp_2m_sde (`mehldau.nn.diffusion.SOLVERS`; eta is DDIM's)
    spacing: str = "uniform"  # timesteps even in t, or in log-SNR (`diffusion.SPACINGS`)

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.every < 1:
            raise ValueError(f"candidates and every must be >= 1, got {self.candidates}, "
                             f"{self.every}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing '{self.spacing}'; choose from "
                             f"{', '.join(SPACINGS)}")
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver '{self.solver}'; choose from {', '.join(SOLVERS)}")
        if self.solver == "dpmpp_2m":
            raise ValueError("SCG needs a stochastic sampler; dpmpp_2m is deterministic (use "
                             "dpmpp_2m_sde, or ddim with eta > 0)")
        if self.solver == "ddim" and self.eta <= 0:
            raise ValueError(f"SCG needs a stochastic sampler (eta > 0), got eta={self.eta}")
        if not 0 <= self.t_end <= self.t_start:
            raise ValueError(f"need 0 <= t_end <= t_start, got {self.t_end}, {self.t_start}")

    def make_solver(self, schedule: NoiseSchedule) -> Solver:
        return Solver(schedule, self.solver, self.eta, self.spacing)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SCGStep:
    x_prev: Tensor  # (B, ...): the chosen candidate for x_{t_prev}
    x0: Tensor  # (B, ...): its predicted clean latent
    eps: Tensor  # (B, ...): denoiser(x_prev, t_prev), reused by the next step
    loss: Tensor  # (B,): its loss


def _ts(t: int, n: int, device: torch.device) -> Tensor:
    return torch.full((n,), t, dtype=torch.long, device=device)


@torch.no_grad()
def scg_step(denoiser: Denoiser, decode: Decode, loss_fn: LossFn, schedule: NoiseSchedule,
             x_t: Tensor, eps: Tensor, t: int, t_prev: int, candidates: int, eta: float,
             generator: torch.Generator | None = None, inpaint: Inpaint | None = None,
             solver: Solver | None = None) -> SCGStep:
    """One guided step from x_t (B, ...) whose eps = denoiser(x_t, t) is already known;
    `inpaint`'s rows are held in every candidate. `solver` (default DDIM with `eta`, which
    is then all `eta` sets) gives the step's mean and sigma."""
    solver = solver or Solver(schedule, "ddim", eta)
    if not solver.stochastic:
        raise ValueError(f"SCG needs a stochastic sampler (eta > 0 or dpmpp_2m_sde), got "
                         f"{solver.name} with eta={solver.eta}")
    if t_prev < 0:
        raise ValueError("the last step (t_prev = -1) has sigma = 0: nothing to choose")
    n, B = candidates, x_t.size(0)
    mean, sigma, _ = solver.mean_std(x_t, eps, t, t_prev)
    noise = torch.randn((n, *x_t.shape), generator=generator, device=x_t.device,
                        dtype=x_t.dtype)  # (n, B, ...)
    cand = (mean + sigma * noise).flatten(0, 1)  # (n*B, ...), candidate-major
    if inpaint is not None:
        cand = inpaint.hold(cand, schedule, t_prev, generator)
    eps_c = denoiser(cand, _ts(t_prev, n * B, x_t.device))  # (n*B, ...): one batched call
    a = schedule.abar(t_prev)
    x0_c = (cand - (1 - a) ** 0.5 * eps_c) / a**0.5  # (n*B, ...): Tweedie estimate
    scored = x0_c if inpaint is None else inpaint.hold(x0_c, schedule, -1)
    loss = loss_fn(decode(scored))  # one batched decode
    if loss.shape != (n * B,):
        raise ValueError(f"loss_fn must return ({n * B},), got {tuple(loss.shape)}")
    best = loss.view(n, B).argmin(dim=0)  # (B,): lowest loss wins, the first on ties
    pick = best * B + torch.arange(B, device=x_t.device)  # (B,) rows of the flat candidates
    return SCGStep(cand[pick], x0_c[pick], eps_c[pick], loss[pick])


class _SCGHook:
    """`ddim_sample`'s step hook: guided steps inside the window, plain DDIM steps elsewhere,
    reusing the winner's eps so each step calls the denoiser once."""

    def __init__(self, denoiser: Denoiser, decode: Decode, loss_fn: LossFn,
                 solver: Solver, cfg: SCGConfig, generator: torch.Generator | None,
                 inpaint: Inpaint | None = None):
        self.denoiser, self.decode, self.loss_fn = denoiser, decode, loss_fn
        self.solver, self.schedule = solver, solver.schedule
        self.cfg, self.generator = cfg, generator
        self.inpaint = inpaint
        self.eps: Tensor | None = None  # denoiser(x_t, t) when the last step computed it
        self.in_window = 0  # steps seen inside the window, for `every`

    def __call__(self, x: Tensor, t: int, t_prev: int) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        eps = self.eps if self.eps is not None else self.denoiser(x, _ts(t, x.size(0), x.device))
        self.eps = None
        guided = False
        if cfg.t_end <= t <= cfg.t_start:
            guided = self.in_window % cfg.every == 0 and t_prev >= 0
            self.in_window += 1
        if not guided:
            x_prev, x0 = self.solver.step(x, eps, t, t_prev, self.generator)
            if self.inpaint is not None:
                x_prev = self.inpaint.hold(x_prev, self.schedule, t_prev, self.generator)
            return x_prev, x0
        out = scg_step(self.denoiser, self.decode, self.loss_fn, self.schedule, x, eps, t,
                       t_prev, cfg.candidates, cfg.eta, self.generator, self.inpaint,
                       self.solver)
        self.eps = out.eps
        return out.x_prev, out.x0


@torch.no_grad()
def scg_sample(denoiser: Denoiser, decode: Decode, loss_fn: LossFn | None,
               schedule: NoiseSchedule, shape: tuple[int, ...], steps: int = 50,
               cfg: SCGConfig | None = None, generator: torch.Generator | None = None,
               x_T: Tensor | None = None, device: torch.device | str | None = None,
               inpaint: Inpaint | None = None) -> Tensor:
    """Sample latents x_0 of `shape` with SCG; `loss_fn=None` samples without guidance (the
    plain sampler of cfg.solver and cfg.eta, the same seed mapping). `inpaint`: rows held to
    known latents (prompt continuation). Decode the result with `decode` for rolls."""
    cfg = cfg or SCGConfig()
    solver = cfg.make_solver(schedule)
    hook = None if loss_fn is None else _SCGHook(denoiser, decode, loss_fn, solver, cfg,
                                                 generator, inpaint)
    return sample(denoiser, solver, shape, steps, generator, x_T, device, hook, inpaint)
