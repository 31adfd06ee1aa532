"""The style judge's training cost: one ResNet step on 30 s clips, the memory plan beside the
measured peak, the clip renderer, and what that makes of training on PiJAMA. All measured in
one run.

    python benchmarks/style_judge.py                          # CPU, ResNet-18, 4 clips a step
    python benchmarks/style_judge.py --device cuda --dtype bf16 --batch 32

Random weights and made-up clips (speed does not depend on training). A step is forward,
backward and AdamW, timed over `--steps` after one warm-up step. The projection divides
PiJAMA's training-split hours (152.5 h of the 223.6 h at seed 0: the album splits' train
side) into clips of `--seconds`, and prices `--passes` passes over them at the measured rate:
an estimate from one measured step, not a measured training run.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from mehldau.data.clips import render_clip
from mehldau.nn.performer_classifier import PerformerClassifier, PerformerClassifierConfig
from mehldau.train import memory

PIJAMA_TRAIN_HOURS = 152.5  # benchmarks/splits.py on the published pijama.csv, seed 0
PRESETS = {"resnet18": {}, "tiny": {"layers": (1, 1, 1), "widths": (16, 32, 64),
                                    "stem_width": 16}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--preset", default="resnet18", choices=list(PRESETS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--fps", type=int, default=100)
    ap.add_argument("--classes", type=int, default=25, help="PiJAMA: 24 pianists + other")
    ap.add_argument("--passes", type=float, default=20, help="passes over the training hours")
    a = ap.parse_args()
    device = torch.device(a.device)
    frames = int(a.seconds * a.fps)
    model = PerformerClassifier(PerformerClassifierConfig(num_classes=a.classes,
                                                          **PRESETS[a.preset])).to(device)
    params = sum(p.numel() for p in model.parameters())

    def batch(rows: int) -> dict[str, torch.Tensor]:
        return {"x": torch.rand(rows, 1, 88, frames, device=device),
                "labels": torch.randint(0, a.classes, (rows,), device=device)}

    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if a.dtype == "bf16"
                else nullcontext())
    plan = memory.plan(model, batch, a.batch, False, None, device,
                       lambda: torch.autocast(device.type, dtype=torch.bfloat16)
                       if a.dtype == "bf16" else nullcontext(), a.batch)
    with FlopCounterMode(display=False) as counter:
        with autocast:
            model(**batch(1)).loss.backward()
    flops = counter.get_total_flops()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        data = batch(a.batch)
        with autocast:
            loss = model(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    per_step = (time.perf_counter() - t0) / a.steps
    clips_per_s = a.batch / per_step
    print(f"style judge {a.preset}: {params / 1e6:.2f} M parameters, {a.classes} classes, "
          f"clips of {a.seconds:g} s at {a.fps} fps ({frames} frames) on {device} {a.dtype}")
    print(f"training FLOPs per clip (forward + backward): {flops / 1e9:.1f} GFLOP")
    print(f"step of {a.batch} clips: {per_step:.3f} s ({clips_per_s:.2f} clips/s, "
          f"{flops * clips_per_s / 1e9:.1f} GFLOP/s achieved)")
    print(f"memory plan: peak {plan.total() / 2**30:.2f} GiB for {a.batch} rows (activations "
          f"{plan.activations_per_row / 2**20:.0f} MiB a row)")
    if device.type == "cuda":
        print(f"measured peak (max_memory_allocated): "
              f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB; plan / measured "
              f"{plan.total() / torch.cuda.max_memory_allocated(device):.2f}")
    rng = np.random.default_rng(0)
    on = np.sort(rng.uniform(0, 600, 6000))  # ten minutes at 10 notes/s, a dense piece
    notes = np.stack([on, on + rng.exponential(0.4, len(on)), rng.integers(21, 109, len(on)),
                      rng.integers(20, 120, len(on))], 1).astype(np.float32)
    t0 = time.perf_counter()
    for k in range(50):
        render_clip(notes, float(k * 10), a.seconds, a.fps)
    render_ms = (time.perf_counter() - t0) / 50 * 1000
    print(f"rendering one clip from notes: {render_ms:.2f} ms ({1000 / render_ms:.0f} clips/s "
          "on one core)")
    clips = PIJAMA_TRAIN_HOURS * 3600 / a.seconds * a.passes
    hours = clips / clips_per_s / 3600
    print(f"estimate, PiJAMA: {a.passes:g} passes over {PIJAMA_TRAIN_HOURS} training hours = "
          f"{clips:,.0f} clips = {clips * flops:.2e} FLOP; at the measured rate "
          f"{hours:.1f} h on this device ({clips / a.batch:,.0f} steps of {a.batch})")


if __name__ == "__main__":
    main()
