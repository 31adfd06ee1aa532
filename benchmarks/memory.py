"""Memory of adapting the released Moonbeam sizes: the memory plan (`mehldau.train.memory`)
and, with `--step`, one real training step's peak memory and seconds, for plain LoRA,
checkpointed LoRA and QLoRA + checkpointing (ratios to plain).

    python benchmarks/memory.py                        # plans only, 309M at context 2048
    python benchmarks/memory.py --size 839M --context 2048 --batch 8
    python benchmarks/memory.py --step --variants ckpt qlora_ckpt   # one real step each

The weights are random, in the released layout (nothing is downloaded); the batch is the
branch's own packed crops of a made-up piece. A real step runs in a child process per
variant, so each peak (CUDA: max allocated; CPU: the child's peak resident set) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

VARIANTS = {"plain": ("lora", False), "ckpt": ("lora", True), "qlora_ckpt": ("qlora", True)}


def build(size: str, context: int, kind: str, device: str):
    from mehldau.adapters import AdapterConfig
    from mehldau.data.dataset import Augmentation
    from mehldau.data.packing import PackedCropDataset
    from mehldau.nn.moonbeam import MoonbeamConfig, MoonbeamForCausalLM
    from mehldau.recipes.run import made_up_score
    from mehldau.tokenize.base import build_tokenizer

    cfg = MoonbeamConfig.released(size)
    cfg.max_len = context
    torch.manual_seed(0)
    model = MoonbeamForCausalLM(cfg).to(device)
    tokenizer = build_tokenizer("moonbeam", {"onset_vocab_size": cfg.onset_vocab_size,
                                             "dur_vocab_size": cfg.dur_vocab_size,
                                             "fold_pedal": False})
    items = PackedCropDataset([tokenizer.encode(made_up_score(context + 8))], context, tokenizer, 0,
                              Augmentation())
    adapter = AdapterConfig(kind=kind, alpha=32, targets=[
        "q_proj", "k_proj", "v_proj", "o_proj", "decoder_embedding", "summary_projection",
        "lm_head", "fc_out"])

    def probe(rows: int) -> dict[str, torch.Tensor]:
        batch = [items[i] for i in range(rows)]
        return {k: torch.stack([b[k] for b in batch]).to(device) for k in batch[0]}

    return model, adapter, probe


def plan_line(size: str, context: int, batch: int, variant: str, device: str) -> dict:
    from mehldau.train import memory

    kind, ckpt = VARIANTS[variant]
    model, adapter, probe = build(size, context, kind, device)
    def autocast():  # as the trainer: bf16 on CUDA
        return torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    p = memory.plan(model, probe, batch, ckpt, adapter, torch.device(device), autocast)
    return {"variant": variant, "total_gib": p.total() / memory.GiB,
            "weights_gib": p.weights / memory.GiB,
            "activations_gib": p.activations_per_row * batch / memory.GiB}


def one_step(size: str, context: int, batch: int, variant: str, device: str) -> dict:
    """One optimizer step as the trainer takes it; peak memory and seconds."""
    from mehldau.adapters import apply_lora
    from mehldau.adapters.qlora import quantize_4bit
    from mehldau.nn.checkpointing import set_activation_checkpointing
    from mehldau.train.memory import give_back

    kind, ckpt = VARIANTS[variant]
    model, adapter, probe = build(size, context, kind, device)
    if kind == "qlora":
        quantize_4bit(model, torch.bfloat16 if device == "cuda" else torch.float32, device)
        give_back()  # as the recipe does: the fp32 weights just replaced
    model = apply_lora(model, adapter)
    set_activation_checkpointing(model, ckpt)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch_t = probe(batch)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(**batch_t).loss
    loss.backward()
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"variant": variant, "peak_gib": peak / 2**30, "seconds": seconds,
            "loss": float(loss)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="309M", choices=["309M", "839M"])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--step", action="store_true", help="also run one real step per variant")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--plan-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one_step(a.size, a.context, a.batch, a.child, a.device)))
        return 0
    if a.plan_child:
        print(json.dumps(plan_line(a.size, a.context, a.batch, a.plan_child, a.device)))
        return 0
    from mehldau.train.memory import GiB, budget_bytes

    budget = budget_bytes(torch.device(a.device), None) / GiB
    print(f"Moonbeam {a.size}, context {a.context}, batch {a.batch}, {a.device} "
          f"({budget:.1f} GiB available)")
    rows = []
    for v in a.variants:
        row = {"variant": v}
        # each in its own process: a released-size model is gigabytes, and one process
        # building several does not give the memory back
        for flag, what in (("--plan-child", "plan"), ("--child", "step")):
            if what == "step" and not a.step:
                continue
            if what == "step" and row.get("total_gib", 0) > budget:
                # a step the plan says cannot fit would only be killed by the kernel
                row["step"] = f"skipped: planned {row['total_gib']:.1f} GiB > {budget:.1f} GiB"
                continue
            out = subprocess.run([sys.executable, __file__, flag, v, "--size", a.size,
                                  "--context", str(a.context), "--batch", str(a.batch),
                                  "--device", a.device], capture_output=True, text=True)
            if out.returncode != 0:
                row[what] = f"failed (exit {out.returncode}): {out.stderr.strip()[-200:]}"
            else:
                row.update(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r for r in rows if r["variant"] == "plain" and "peak_gib" in r), None)

    def ratio(r: dict, key: str) -> str:
        return f"{r[key] / base[key]:.2f}" if key in r and base else "-"

    def num(r: dict, key: str) -> str:
        return f"{r[key]:.2f}" if isinstance(r.get(key), float) else "-"

    print(f"{'variant':<12} {'plan GiB':>9} {'peak GiB':>9} {'s/step':>8} {'peak/plain':>11}"
          f" {'time/plain':>11}")
    for r in rows:
        print(f"{r['variant']:<12} {num(r, 'total_gib'):>9} {num(r, 'peak_gib'):>9} "
              f"{num(r, 'seconds'):>8} {ratio(r, 'peak_gib'):>11} {ratio(r, 'seconds'):>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
