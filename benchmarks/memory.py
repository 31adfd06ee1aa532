"""The memory plan (`mehldau.train.memory`) against what training really holds.

`--branches`: for every branch (production, perceiver_mt, moonbeam_lora, scg_diffusion's
autoencoder and diffusion stages), at its tiny preset and at a larger setting, the branch's
own `train()` runs up to its memory plan in a child process, then two real optimizer steps
as the trainer takes them (micro-batches, autocast, clipping, AdamW, zero_grad) on the
plan's own made-up items; no corpus is read. The table gives the plan, the measured peak
(CPU: the child's peak resident set, VmHWM; CUDA: max_memory_allocated) and their ratio,
for the whole process and for the model's part: the plan less its runtime against the peak
less the resident set measured just before the model was built. That model part also holds
the library code the first forwards and the optimizer make resident (~80-100 MB on a CPU,
which the plan counts as runtime), so it reads high for the tiny presets, whose models are a
few MB; the last column measures from the resident set as training starts, less the model's
tensors, which isolates what the plan predicts beyond its runtime.

    python benchmarks/memory.py --branches                 # every branch, tiny and large
    python benchmarks/memory.py --branches production --settings large

Without `--branches`: adapting the released Moonbeam sizes, the plan and, with `--step`,
one real training step's peak memory and seconds, for plain LoRA, checkpointed LoRA and
QLoRA + checkpointing (ratios to plain).

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
            "activations_gib": p.activations(batch) / memory.GiB}


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


# Each branch at its tiny preset and at a larger setting whose model part (weights,
# gradients, optimizer state, activations) is hundreds of MB, still seconds a step on a CPU.
SETTINGS: dict[str, dict[str, list[str]]] = {
    "production": {
        "tiny": ["model=tiny"],
        "large": ["model=tiny", "model.d_model=384", "model.n_layers=4", "model.d_ff=1536",
                  "model.n_heads=6", "model.max_seq_len=512", "train.batch_size=4"]},
    "perceiver_mt": {
        "tiny": ["model=perceiver_tiny"],
        "large": ["model=perceiver_tiny", "model.d_model=384", "model.n_layers=4",
                  "model.d_ff=1536", "model.n_heads=6", "model.max_seq_len=2048",
                  "model.num_latents=256", "train.batch_size=4"]},
    "moonbeam_lora": {
        "tiny": ["model=moonbeam_tiny"],
        "large": ["model=moonbeam_tiny", "model.hidden_size=384",
                  "model.intermediate_size=1536", "model.num_hidden_layers=4",
                  "model.context_len=512", "model.decoder_hidden_size=256",
                  "train.batch_size=4", "train.micro_batch_size=null",
                  "train.activation_checkpointing=false"]},
    "scg_autoencoder": {
        "tiny": ["model=scg_tiny", "stage=autoencoder"],
        "large": ["model=scg_tiny", "stage=autoencoder", "model.autoencoder.channels=[32,64,128]",
                  "model.autoencoder_frames=512", "train.stages.autoencoder.batch_size=8"]},
    "scg_diffusion": {
        "tiny": ["model=scg_tiny", "stage=diffusion"],
        "large": ["model=scg_tiny", "stage=diffusion", "model.dit.hidden_size=512",
                  "model.dit.depth=6", "model.dit.num_heads=8",
                  "train.stages.diffusion.batch_size=16"]},
}
BRANCH_OF = {"scg_autoencoder": "scg_diffusion"}


class _Measured(Exception):
    """Carries the measurement out of the branch's `train()`, which stops at its plan."""


def _vm_hwm() -> int:
    with open("/proc/self/status") as f:  # peak resident set, bytes
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


def _vm_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))


def branch_step(name: str, overrides: list[str], steps: int = 2) -> dict:
    """The branch's `train()` up to its memory plan, then `steps` optimizer steps as the
    trainer takes them on the plan's own items; the plan's figures and the measured peak.
    The device is the trainer's (accelerate's: CUDA when there is one)."""
    import importlib
    import tempfile

    from torch.utils.data import default_collate

    import mehldau.recipes.autoregressive as ar
    import mehldau.recipes.run as setup
    from mehldau.cli.common import compose, finalize
    from mehldau.nn.checkpointing import set_activation_checkpointing
    from mehldau.train import memory, trainer

    tmp = tempfile.mkdtemp(prefix="mehldau-memory-")
    cfg = compose("train", [f"branch={BRANCH_OF.get(name, name)}", *overrides, "logger=none",
                            f"run_dir={tmp}/run", f"cache_dir={tmp}/cache"])
    finalize(cfg)
    recipe = importlib.import_module(cfg.branch.recipe)
    found: dict = {}
    setup.run_pieces = lambda cfg: []  # the plan's made-up items train; no corpus is listed
    if hasattr(recipe, "_autoencoder_run"):  # the diffusion stage: a fresh autoencoder
        recipe._autoencoder_run = lambda cfg: (None, recipe._tokenizer(cfg),
                                               recipe.autoencoder_config(cfg))

    def seeded(seed: int, *a, **k) -> None:  # every recipe seeds just before its model
        memory.give_back()
        found["baseline"] = _vm_rss()
        found.setdefault("seed", set_seed)(seed, *a, **k)

    from accelerate.utils import set_seed
    for module in (ar, recipe):
        if hasattr(module, "set_seed"):
            module.set_seed = seeded
    planner = memory.plan

    def plan(*a, **k) -> memory.MemoryPlan:
        found["plan"] = planner(*a, **k)
        return found["plan"]

    memory.plan = plan
    original = setup.plan_memory

    def plan_and_step(tcfg, accelerator, model, items, adapter=None):
        before_plan = _vm_rss()
        tcfg = original(tcfg, accelerator, model, items, adapter)
        p: memory.MemoryPlan = found["plan"]
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            baseline = 0
        else:
            baseline = found["baseline"]
        set_activation_checkpointing(model, tcfg.activation_checkpointing)
        # what the process holds beside the model as training starts: the interpreter and
        # the library code the plan's forwards have made resident
        start = _vm_rss() - sum(t.untyped_storage().nbytes() for t in (
            *model.parameters(), *model.buffers()) if t.device.type == "cpu")
        optimizer = trainer._optimizer(model, tcfg)
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        batch = {k: v.to(accelerator.device) for k, v in default_collate(
            [items[i % len(items)] for i in range(tcfg.batch_size)]).items()}
        for _ in range(steps):
            for part in trainer._micro_batches(batch, tcfg.micro_batch_size):
                with accelerator.autocast():
                    loss = model(**part).loss
                    accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() if accelerator.device.type == "cuda" \
            else _vm_hwm()
        raise _Measured({
            "branch": name, "rows": p.rows, "batch": tcfg.batch_size,
            "params_mb": sum(q.numel() for q in model.parameters()) / 1e6,
            "plan": p.total(), "runtime": p.runtime, "static": p.static,
            "activations": p.activations(), "transient": p.step_transient, "peak": peak,
            "baseline": baseline,
            "before_plan": before_plan, "start": 0 if baseline == 0 else start,
            "loss": float(loss.detach())})

    setup.plan_memory = plan_and_step
    if hasattr(recipe, "plan_memory"):
        recipe.plan_memory = plan_and_step
    try:
        recipe.train(cfg)
    except _Measured as m:
        return m.args[0]
    raise RuntimeError(f"{name}: train() never reached its memory plan")


def branch_rows(names: list[str], settings: list[str], device: str) -> list[dict]:
    """One child process per branch and setting (each peak its own); prints the table."""
    rows = []
    print(f"{'branch':<16} {'setting':<6} {'params':>7} {'rows':>4} {'plan MB':>8} "
          f"{'peak MB':>8} {'ratio':>6} {'model plan':>10} {'model peak':>10} {'ratio':>6} "
          f"{'from start':>10} {'ratio':>6}")
    for name in names:
        for setting in settings:
            out = subprocess.run([sys.executable, __file__, "--branch-child", name,
                                  "--setting", setting, "--device", device],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{name:<16} {setting:<6} failed (exit {out.returncode}): "
                      f"{out.stderr.strip()[-300:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["setting"] = setting
            r["model_plan"] = r["plan"] - r["runtime"]
            r["model_peak"] = r["peak"] - r["baseline"]
            r["ratio"] = r["peak"] / r["plan"]
            r["model_ratio"] = r["model_peak"] / r["model_plan"]
            r["start_peak"] = r["peak"] - r["start"]
            r["start_ratio"] = r["start_peak"] / r["model_plan"]
            rows.append(r)
            mb = 2**20
            print(f"{name:<16} {setting:<6} {r['params_mb']:>6.1f}M {r['rows']:>4} "
                  f"{r['plan'] / mb:>8.0f} {r['peak'] / mb:>8.0f} {r['ratio']:>6.2f} "
                  f"{r['model_plan'] / mb:>10.0f} {r['model_peak'] / mb:>10.0f} "
                  f"{r['model_ratio']:>6.2f} {r['start_peak'] / mb:>10.0f} "
                  f"{r['start_ratio']:>6.2f}", flush=True)
    return rows


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
    ap.add_argument("--branches", nargs="*", choices=list(SETTINGS),
                    help="plan against measured peak for these branches (none named: all)")
    ap.add_argument("--settings", nargs="+", default=["tiny", "large"],
                    choices=["tiny", "large"])
    ap.add_argument("--branch-child", help=argparse.SUPPRESS)
    ap.add_argument("--setting", default="tiny", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.branch_child:
        print(json.dumps(branch_step(a.branch_child, SETTINGS[a.branch_child][a.setting]
                                     if a.overrides is None else a.overrides)))
        return 0
    if a.branches is not None:
        branch_rows(a.branches or list(SETTINGS), a.settings, a.device)
        return 0
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
