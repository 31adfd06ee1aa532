"""Perceiver AR vs. a plain causal Transformer of equal depth: training cost against context.

For M = 1,024, 2,048, 4,096, 8,192 inputs with N latents fixed (default 512), one run prints
the seconds per training step (forward + backward + AdamW, median of the timed steps) and the
peak memory of a Perceiver AR step, and the same for the production Music Transformer with
the same width and depth at context M where it fits (`--plain-max`). The figure to read is
step(8192) / step(1024) for Perceiver AR (the paper's claim: only the cross-attention layer
grows with M, linearly). Each case runs in a fresh subprocess; CPU memory is the peak RSS
of the step above the RSS after building the model (Linux VmHWM), CUDA memory is
`max_memory_allocated` above the model.

    python benchmarks/perceiver.py                     # CPU: the base preset's d=512, 8 layers
    python benchmarks/perceiver.py --d-model 128 --layers 4    # the tiny width
    python benchmarks/perceiver.py --device cuda --dtype bf16 --plain-max 8192
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CASE = r'''
import json, statistics, sys, time, torch
args = json.loads(sys.argv[1])
dev, dtype = args["device"], {"fp32": torch.float32, "bf16": torch.bfloat16}[args["dtype"]]
torch.manual_seed(0)
M, N, d, L, B = args["M"], args["N"], args["d"], args["layers"], args["batch"]
common = dict(vocab_size=311, n_layers=L, d_model=d, n_heads=max(d // 64, 2), d_ff=4 * d,
              max_relative_position=min(1024, M), dropout=0.1)
if args["kind"] == "perceiver":
    from mehldau.nn.perceiver_ar import PerceiverAR, PerceiverARConfig
    model = PerceiverAR(PerceiverARConfig(max_seq_len=M, num_latents=N, **common))
else:
    from mehldau.nn.music_transformer import MusicTransformer, MusicTransformerConfig
    model = MusicTransformer(MusicTransformerConfig(max_seq_len=M, **common))
model = model.to(dev).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
ids = torch.randint(3, 311, (B, M + 1), device=dev)
x, y = ids[:, :-1], ids[:, 1:]
def kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def step():
    with torch.autocast(device_type=dev, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(x, labels=y).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
step()  # warm-up (optimizer state allocated, kernels loaded)
if dev == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
else:
    open("/proc/self/clear_refs", "w").write("5"); base = kb("VmRSS:")
times = []
for _ in range(args["steps"]):
    t0 = time.perf_counter(); step()
    if dev == "cuda": torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
peak = (torch.cuda.max_memory_allocated() if dev == "cuda" else kb("VmHWM:")) - base
print(json.dumps({"s_per_step": statistics.median(times), "peak_bytes": peak}))
'''


def run_case(**kw) -> dict | None:
    res = subprocess.run([sys.executable, "-c", CASE, json.dumps(kw)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  ({kw['kind']} M={kw['M']} failed: {tail[:120]})", flush=True)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--latents", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--contexts", default="1024,2048,4096,8192")
    ap.add_argument("--plain-max", type=int, default=2048,
                    help="largest context for the plain Transformer (memory grows as M^2)")
    a = ap.parse_args()
    ctx = [int(c) for c in a.contexts.split(",")]
    rows = {}
    print(f"{'kind':10s} {'M':>6s} {'s/step':>9s} {'peak MiB':>10s}")
    for kind in ("perceiver", "plain"):
        for M in ctx:
            if kind == "plain" and M > a.plain_max:
                continue
            r = run_case(kind=kind, M=M, N=a.latents, d=a.d_model, layers=a.layers,
                         batch=a.batch, steps=a.steps, device=a.device, dtype=a.dtype)
            if r is None:
                continue
            rows[f"{kind}_{M}"] = r
            print(f"{kind:10s} {M:6d} {r['s_per_step']:9.3f} {r['peak_bytes'] / 2**20:10.1f}",
                  flush=True)
    lo, hi = f"perceiver_{ctx[0]}", f"perceiver_{ctx[-1]}"
    if lo in rows and hi in rows:
        ratio = rows[hi]["s_per_step"] / rows[lo]["s_per_step"]
        print(f"perceiver step({ctx[-1]}) / step({ctx[0]}) = {ratio:.2f} (goal <= 2)")
    for M in ctx:
        p, t = rows.get(f"perceiver_{M}"), rows.get(f"plain_{M}")
        if p and t:
            print(f"M={M}: plain / perceiver step time {t['s_per_step'] / p['s_per_step']:.2f}, "
                  f"memory {t['peak_bytes'] / max(p['peak_bytes'], 1):.2f}")
    print(json.dumps({"args": vars(a), "results": rows}))


if __name__ == "__main__":
    main()
