"""Adapter benchmarks: full fine-tuning vs. LoRA vs. QLoRA on the same model, in one run.

For the production `base` preset (`MusicTransformerConfig()`: 6 layers, d=512, 8 heads, FFN
2048, vocab 311) at one context length, each variant reports:

- trainable parameters (and the total, 4-bit weights counted by their real element count);
- its checkpoint on disk: full = the whole `safetensors` state dict; LoRA / QLoRA = peft's
  `save_pretrained` (adapter_model.safetensors; the directory total with config and README
  is in the JSON);
- peak memory during a few training steps, each variant in a fresh subprocess:
  CUDA: `torch.cuda.max_memory_allocated` over the training steps (weights, gradients,
  optimizer state, activations; the peak counter is reset after the model is built);
  CPU (Linux): peak RSS during the training steps (VmHWM, reset through
  /proc/self/clear_refs after the model is built) minus the RSS before the model was built,
  i.e. model + training memory without the interpreter and libraries; the absolute peak RSS
  is in the JSON too;
- seconds per training step: the median over the timed steps, after a warm-up step.

Variants: full (AdamW on everything), LoRA (q/k/v/o, r=8, alpha=16, AdamW), QLoRA (the
frozen base in NF4 with double quantization, the same LoRA on top; paged 8-bit AdamW on
CUDA, plain AdamW on CPU). On CUDA `--dtype bf16` (the default there) trains full and LoRA
under bf16 autocast and QLoRA with bf16 compute; on CPU the default is fp32.

    python benchmarks/adapters.py                      # CPU, fp32, L=512
    python benchmarks/adapters.py --seq-len 256 --steps 2
    python benchmarks/adapters.py --device cuda        # bf16, L=2048
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ("full", "lora", "qlora")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LR, WEIGHT_DECAY, BETAS = 1e-4, 0.01, (0.9, 0.95)


def proc_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


def release_freed_heap() -> None:
    """Give freed heap back to the OS (glibc), so RSS counts live memory, not the build's."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def worker(variant: str, device: str, dtype: torch.dtype, L: int, batch: int,
           steps: int) -> dict:
    """Build one variant, train it, measure; runs in its own process."""
    from mehldau.adapters.lora import AdapterConfig, apply_lora, trainable_parameters
    from mehldau.nn.music_transformer import MusicTransformer, MusicTransformerConfig

    cuda = device == "cuda"
    # Load every library (peft, bitsandbytes) and the CPU kernels before the memory baseline.
    import peft  # noqa: F401

    from mehldau.adapters.qlora import import_bnb, make_optimizer, quantize_4bit

    if variant == "qlora":
        import_bnb()
    tiny = MusicTransformer(MusicTransformerConfig(n_layers=1, d_model=64, n_heads=2, d_ff=64))
    tiny(torch.zeros(1, 8, dtype=torch.long), labels=torch.zeros(1, 8, dtype=torch.long)
         ).loss.backward()
    del tiny
    torch.manual_seed(0)
    default = MusicTransformerConfig()
    cfg = MusicTransformerConfig(max_seq_len=max(L, default.max_seq_len))
    ids = torch.randint(0, cfg.vocab_size, (batch, L + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]
    if not cuda:
        release_freed_heap()
    rss_before = 0 if cuda else proc_kb("VmRSS:") * 1024

    model = MusicTransformer(cfg)
    if variant == "qlora":
        quantize_4bit(model, dtype, device)  # the nn.Linear layers, moved and quantized
    model = model.to(device)  # everything else
    if variant != "full":
        model = apply_lora(model, AdapterConfig(kind=variant))
    trainable, total = trainable_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if variant == "qlora":
        opt = make_optimizer(params, LR, WEIGHT_DECAY, BETAS, device)
    else:
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS)
    # bf16: autocast for full and LoRA; QLoRA computes in bf16 through its compute_dtype,
    # and autocast covers its full-precision parts (head, attention, LoRA matrices) alike.
    autocast = dtype != torch.float32
    model.train()

    def step() -> float:
        with torch.autocast(device_type=device, dtype=dtype, enabled=autocast):
            loss = model(x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    if cuda:
        torch.cuda.synchronize()
        built = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        release_freed_heap()
        built = proc_kb("VmRSS:") * 1024 - rss_before
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    losses = [step()]  # warm-up (and compilation of flex attention on CUDA)
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    s_per_step = statistics.median(times)  # robust to a busy shared machine
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        peak_abs = peak
    else:
        peak_abs = proc_kb("VmHWM:") * 1024
        peak = peak_abs - rss_before

    with tempfile.TemporaryDirectory() as tmp:
        if variant == "full":
            from safetensors.torch import save_file

            path = Path(tmp) / "model.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
            ckpt, ckpt_dir = path.stat().st_size, path.stat().st_size
        else:
            model.save_pretrained(tmp)
            ckpt = (Path(tmp) / "adapter_model.safetensors").stat().st_size
            ckpt_dir = dir_bytes(Path(tmp))
    assert all(v == v for v in losses), f"{variant}: NaN loss"
    return {"trainable": trainable, "total": total, "ckpt_bytes": ckpt,
            "ckpt_dir_bytes": ckpt_dir, "built_bytes": built, "peak_bytes": peak,
            "peak_abs_bytes": peak_abs, "s_per_step": s_per_step, "step_times": times,
            "loss_first": losses[0], "loss_last": losses[-1]}


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant,
           "--device", args.device, "--dtype", args.dtype, "--seq-len", str(args.seq_len),
           "--batch", str(args.batch), "--steps", str(args.steps)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr)
        raise SystemExit(f"{variant} failed (exit {res.returncode})")
    return json.loads(res.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:9.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=("cpu", "cuda"))
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="fp32 or bf16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="context length (default: 512 on CPU, 2048 on CUDA)")
    ap.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 8 on CUDA")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps after one warm-up step (default: 3 on CPU, 10 on CUDA)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but no CUDA device is available")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.seq_len = args.seq_len or (2048 if cuda else 512)
    args.batch = args.batch or (8 if cuda else 2)
    args.steps = args.steps or (10 if cuda else 3)

    if args.worker:
        out = worker(args.worker, args.device, DTYPES[args.dtype], args.seq_len, args.batch,
                     args.steps)
        print(json.dumps(out))
        return

    results: dict[str, object] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": args.dtype, "seq_len": args.seq_len, "batch": args.batch,
        "steps": args.steps, "threads": torch.get_num_threads(),
        "memory": ("cuda max_memory_allocated during training" if cuda else
                   "peak RSS during training minus RSS before the model was built"),
    }
    print(f"base preset, L={args.seq_len}, batch={args.batch}, {args.dtype}, {args.device} "
          f"({results['device']}), {args.steps} timed steps after 1 warm-up", flush=True)
    rows = {}
    for v in args.variants:
        rows[v] = run_variant(v, args)
        r = rows[v]
        print(f"  {v:5s} done: {r['s_per_step']:.2f} s/step, loss {r['loss_first']:.3f} -> "
              f"{r['loss_last']:.3f}", flush=True)
    mem_label = "peak alloc MiB" if cuda else "peak mem MiB"
    print(f"\n{'variant':8s} {'trainable':>12s} {'share %':>8s} {'ckpt MiB':>9s} "
          f"{'model MiB':>9s} {mem_label:>14s} {'s/step':>8s}")
    for v, r in rows.items():
        print(f"{v:8s} {r['trainable']:12,d} {100 * r['trainable'] / r['total']:8.3f} "
              f"{mib(r['ckpt_bytes'])} {mib(r['built_bytes'])} {mib(r['peak_bytes']):>14s} "
              f"{r['s_per_step']:8.3f}")
    print("model MiB: " + ("memory_allocated after the build" if cuda else
                           "RSS increase from building the model (weights)"))
    print(f"{mem_label}: {results['memory']}")
    if "full" in rows:
        for v in ("lora", "qlora"):
            if v in rows:
                print(f"{v}/full: memory {rows[v]['peak_bytes'] / rows['full']['peak_bytes']:.3f}"
                      f", time/step {rows[v]['s_per_step'] / rows['full']['s_per_step']:.2f}, "
                      f"checkpoint {rows[v]['ckpt_bytes'] / rows['full']['ckpt_bytes']:.4f}")
        if "qlora" in rows:
            results["qlora_over_full_memory"] = (rows["qlora"]["peak_bytes"]
                                                 / rows["full"]["peak_bytes"])
    results["variants"] = rows
    print(json.dumps(results))


if __name__ == "__main__":
    main()
