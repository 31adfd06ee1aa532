"""What fixing glibc's mmap threshold costs a CPU training step.

    python benchmarks/cpu_allocator.py [--rounds 2]

The memory plan (`mehldau.train.memory.hand_back_freed_blocks`) fixes the threshold at
128 KiB on CPU so that a step's resident set follows its live tensors and the plan holds;
large blocks then come from fresh, zeroed pages every step. This prints seconds per step of
a 4-layer Music Transformer (d_model 256, 8 x 512 tokens, AdamW) with glibc's default and
with the fixed threshold, each in its own process, and their ratio.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def child(fixed: bool) -> float:
    import torch

    from mehldau.nn.music_transformer import MusicTransformer, MusicTransformerConfig
    from mehldau.train import memory

    if fixed:
        memory.hand_back_freed_blocks()
    torch.manual_seed(0)
    model = MusicTransformer(MusicTransformerConfig(vocab_size=453, n_layers=4, n_heads=8,
                                                    d_model=256, d_ff=1024, max_seq_len=512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 453, (8, 512))

    def step() -> None:
        logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 x.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up
        step()
    t = time.perf_counter()
    for _ in range(8):
        step()
    return (time.perf_counter() - t) / 8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", choices=["default", "fixed"])
    a = ap.parse_args()
    if a.child:
        print(child(a.child == "fixed"))
        return
    times: dict[str, list[float]] = {"default": [], "fixed": []}
    for _ in range(a.rounds):
        for mode in times:
            out = subprocess.run([sys.executable, __file__, "--child", mode], check=True,
                                 capture_output=True, text=True).stdout.split()
            times[mode].append(float(out[-1]))
    for mode, ts in times.items():
        print(f"{mode:8s} " + " ".join(f"{t:.2f}" for t in ts) + " s/step")
    ratio = min(times["fixed"]) / min(times["default"])
    print(f"fixed / default (best of {a.rounds}): {ratio:.2f}")


if __name__ == "__main__":
    main()
