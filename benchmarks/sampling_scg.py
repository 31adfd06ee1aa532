"""scg_diffusion's sampling speed: seconds of music per second of compute (real-time factor)
and reverse steps per second, unguided and guided, at batch 1 and 8 (issue 24).

    python benchmarks/sampling_scg.py                          # CPU, scg_base, fp32
    python benchmarks/sampling_scg.py --device cuda --dtype bf16
    python benchmarks/sampling_scg.py --preset scg_tiny --steps 10   # a quick CPU look

Random weights (speed does not depend on training). The sampler settings are
mehldau-generate's defaults (configs/generate.yaml: sampler.*, scg.*), so a changed default
is what gets measured; "guided" is one SCG draw with every rule on, against a synthetic
reference roll's features (generate also draws the unguided twin, which costs one
"unguided" more); on the CPU only at batch 1. Each case runs once after a warm-up of the DiT
and the decoder. `measure` is what benchmarks/sampling.py calls.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mehldau.guidance.rules import extract_targets, rule_losses, weighted_loss
from mehldau.guidance.stochastic_control_guidance import SCGConfig, scg_sample
from mehldau.nn.latent_diffusion import LatentDiffusion, LatentDiffusionConfig

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(device: str = "cpu", dtype: torch.dtype = torch.float32, *,
            preset: str = "scg_base", batches: tuple[int, ...] = (1, 8),
            guided_batches: tuple[int, ...] | None = None, steps: int | None = None
            ) -> list[dict]:
    """One row per (batch, unguided | guided), printed as a table and returned: seconds,
    real-time factor (music seconds of the whole batch per compute second) and reverse steps
    per second. `steps` overrides the default sampler.steps (for a quick CPU run);
    `guided_batches` defaults to `batches` on a GPU and to batch 1 on the CPU, where a guided
    base-preset batch of 8 decodes 64 candidate rolls per step (tens of minutes)."""
    # the synthetic reference roll of benchmarks/scg.py (benchmarks/ is no package)
    spec = importlib.util.spec_from_file_location("_bench_scg", Path(__file__).with_name("scg.py"))
    bench_scg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_scg)
    m = OmegaConf.to_container(OmegaConf.load(ROOT / f"configs/model/{preset}.yaml"))
    gen_cfg = OmegaConf.load(ROOT / "configs/generate.yaml")
    dcfg = LatentDiffusionConfig(autoencoder=m["autoencoder"], dit=m["dit"], frames=m["frames"])
    torch.manual_seed(0)
    model = LatentDiffusion(dcfg).to(device, dtype).eval()
    sc, sp = gen_cfg.scg, gen_cfg.sampler
    steps = int(steps or sp.steps)
    cfg = SCGConfig(candidates=int(sc.candidates), t_start=int(sc.t_start), t_end=int(sc.t_end),
                    every=int(sc.every), eta=float(sp.eta), solver=str(sp.get("name", "ddim")))
    targets = extract_targets(bench_scg.reference_roll(dcfg.frames))
    music = dcfg.frames / 100  # the pianoroll tokenizer's 100 frames per second

    def loss_fn(rolls: torch.Tensor) -> torch.Tensor:
        return weighted_loss(rule_losses(rolls.float(), targets), {})

    def draw(batch: int, guided: bool) -> float:
        gen = torch.Generator(device=device).manual_seed(0)
        shape = (batch, *dcfg.latent_shape())
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            x_T = torch.randn(shape, generator=gen, device=device).to(dtype)
            z = scg_sample(model.dit, model.decode, loss_fn if guided else None, model.schedule,
                           shape, steps, cfg, gen, x_T=x_T, device=device)
            model.decode(z)
        _sync(device)
        return time.perf_counter() - t0

    if guided_batches is None:
        guided_batches = batches if device.startswith("cuda") else (1,)
    with torch.no_grad():  # warm-up: kernels, allocator (the DiT and a candidates' decode)
        model.dit(torch.zeros(cfg.candidates, *dcfg.latent_shape(), device=device, dtype=dtype),
                  torch.zeros(cfg.candidates, dtype=torch.long, device=device))
        model.decode(torch.zeros(cfg.candidates, *dcfg.latent_shape(), device=device,
                                 dtype=dtype))
    rows = []
    for batch in batches:
        for guided in (False, True)[:1 + (batch in guided_batches)]:
            seconds = draw(batch, guided)
            rows.append({"preset": preset, "device": device, "dtype": str(dtype).split(".")[-1],
                         "batch": batch, "mode": "guided" if guided else "unguided",
                         "solver": cfg.solver, "steps": steps,
                         "candidates": cfg.candidates if guided else None,
                         "seconds": round(seconds, 3),
                         "realtime_factor": round(batch * music / seconds, 3),
                         "steps_per_s": round(steps / seconds, 2)})
    print(f"{preset}, {device} {rows[0]['dtype']}, {cfg.solver} {steps} steps, "
          f"{cfg.candidates} candidates guided, {music:.2f} s per sample")
    print(f"{'batch':>5} {'mode':<9} {'s':>8} {'music s / s':>11} {'steps/s':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['mode']:<9} {r['seconds']:8.2f} {r['realtime_factor']:11.2f} "
              f"{r['steps_per_s']:8.2f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--preset", default="scg_base")
    ap.add_argument("--steps", type=int, default=None, help="default: generate's sampler.steps")
    ap.add_argument("--batches", default="1,8")
    a = ap.parse_args()
    rows = measure(a.device, DTYPES[a.dtype], preset=a.preset, steps=a.steps,
                   batches=tuple(int(b) for b in a.batches.split(",")))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
