"""Stochastic Control Guidance: seconds per guided 10.24 s sample against the number of
candidates n, all measured in one run.

    python benchmarks/scg.py                                   # CPU, the scg_tiny preset
    python benchmarks/scg.py --device cuda --dtype bf16 --preset scg_base

Random weights (speed does not depend on training), batch 1, 50 DDIM steps (eta = 1), guided
from t = 750 down at every step (the reference's window), every rule on (pitch histogram, note
density, chord) against the features of a synthetic reference roll. Each case runs once after
one warm-up sample; "unguided" is the same sampler with no rule. With one candidate per step
SCG still decodes and scores it, so n = 1 costs more than unguided.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from mehldau.guidance.rules import REFERENCE_WEIGHTS, extract_targets, rule_losses
from mehldau.guidance.stochastic_control_guidance import SCGConfig, scg_sample
from mehldau.nn.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from mehldau.tokenize.pianoroll import render, roll_to_tensor

ROOT = Path(__file__).resolve().parents[1]


def reference_roll(frames: int) -> torch.Tensor:
    """A chord every 0.5 s and a line of eighth notes above it, (2, frames, 88)."""
    rng = np.random.default_rng(0)
    starts, pitches = [], []
    for t in range(0, frames, 50):
        for p in (48, 52, 55, 59):
            starts.append(t), pitches.append(p)
        starts.append(t + 25), pitches.append(int(rng.integers(64, 80)))
    s = np.array(starts)
    return roll_to_tensor(render(s, s + 24, np.array(pitches), np.full(len(s), 70), frames))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--preset", default="scg_tiny")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--candidates", default="1,4,8")
    a = ap.parse_args()
    m = OmegaConf.to_container(OmegaConf.load(ROOT / f"configs/model/{a.preset}.yaml"))
    dcfg = LatentDiffusionConfig(autoencoder=m["autoencoder"], dit=m["dit"], frames=m["frames"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    model = LatentDiffusion(dcfg).to(a.device, dtype).eval()
    targets = extract_targets(reference_roll(dcfg.frames))

    def loss_fn(rolls: torch.Tensor) -> torch.Tensor:
        return sum(REFERENCE_WEIGHTS[k] * v for k, v in rule_losses(rolls.float(), targets).items())

    def sample(n: int | None) -> float:
        gen = torch.Generator(device=a.device).manual_seed(0)
        x_T = torch.randn((1, *dcfg.latent_shape()), generator=gen, device=a.device).to(dtype)
        if a.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        z = scg_sample(model.dit, model.decode, None if n is None else loss_fn, model.schedule,
                       x_T.shape, a.steps, SCGConfig(candidates=n or 1), gen, x_T=x_T,
                       device=a.device)
        model.decode(z)
        if a.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    sample(2)  # warm-up
    res = {"unguided": sample(None)}
    ns = [int(n) for n in a.candidates.split(",")]
    for n in ns:
        res[f"n={n}"] = sample(n)
    seconds = dcfg.frames / 100
    print(f"{a.preset} ({model.dit.num_parameters() / 1e6:.2f}M DiT, "
          f"{model.autoencoder.num_parameters() / 1e6:.2f}M autoencoder), {a.device} {a.dtype}, "
          f"{a.steps} DDIM steps, {seconds:.2f} s sample, threads {torch.get_num_threads()}")
    print(f"{'case':<10} {'s/sample':>9} {'ratio to n=1':>13}")
    first = res[f"n={ns[0]}"]
    for k, v in res.items():
        print(f"{k:<10} {v:9.2f} {v / first:13.2f}")
    print(json.dumps({"args": vars(a), "s_per_sample": res}))


if __name__ == "__main__":
    main()
