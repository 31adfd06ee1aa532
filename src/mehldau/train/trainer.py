"""The shared trainer every branch uses: accelerate for device, precision and processes.

AdamW, cosine schedule with warmup (torch's schedulers), gradient accumulation and
clipping, validation loss in nats/token, atomic checkpoints, exact resume (model, optimizer,
scheduler, RNG and data position), `metrics.jsonl`, wandb or no logger, a progress bar.

The model is any `nn.Module` whose `forward(**batch)` returns an object with `.loss` (mean
over labelled tokens); batches are dicts of tensors with `labels` (-100 = ignore), or any
keys with a `count(batch)` that says how many targets the loss averages over. The
scheduler is stepped by hand, not through `accelerator.prepare`, because accelerate steps a
prepared scheduler once per process, which would bend the cosine on several GPUs.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from mehldau.constants import IGNORE_INDEX
from mehldau.data.dataset import CounterSampler
from mehldau.errors import UserError
from mehldau.nn.checkpointing import set_activation_checkpointing
from mehldau.train.checkpoint import latest_checkpoint, save_checkpoint
from mehldau.train.loggers import MetricsFile, NullLogger


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 200
    eval_max_batches: int = 0  # 0 = the whole validation split
    eval_batch_size: int = 16
    ckpt_every: int = 500
    keep_last: int = 3  # checkpoints kept on disk, 0 = all
    seed: int = 0
    mixed_precision: str = "auto"  # "auto" = bf16 on CUDA, fp32 on CPU; or "no", "bf16", "fp16"
    resume: bool = False
    # Memory only (the step's gradient is unchanged): split each batch into micro-batches of
    # this many rows, their losses weighted by their targets; None = the whole batch.
    micro_batch_size: int | str | None = None  # or "auto": the largest the memory plan fits
    activation_checkpointing: bool = False  # `mehldau.nn.checkpointing`
    memory_budget_gb: float | None = None  # the memory plan's budget; None = the device's

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "eval_every",
                     "ckpt_every", "eval_batch_size", "lr"):
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "grad_clip", "keep_last",
                     "eval_max_batches"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("min_lr_ratio", "beta1", "beta2"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        m = self.micro_batch_size
        if m is not None and (m != "auto" if isinstance(m, str) else m <= 0):
            raise UserError(f"train.micro_batch_size must be a positive number, auto or null, "
                            f"got {m!r}")
        if self.memory_budget_gb is not None and self.memory_budget_gb <= 0:
            raise UserError(f"train.memory_budget_gb must be positive, got "
                            f"{self.memory_budget_gb}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise UserError(f"train.mixed_precision must be auto, no, bf16 or fp16, got "
                            f"{self.mixed_precision!r}")


def make_accelerator(mixed_precision: str = "auto") -> Accelerator:
    """accelerate's `Accelerator` ("auto": bf16 autocast on CUDA, fp32 elsewhere), made one
    run of every process the launcher started, or refused before anything is written.

    torchrun on a machine without an accelerator: accelerate joins the processes only when
    told to use the CPU (`ACCELERATE_USE_CPU=true`, `accelerate launch --cpu`); without it
    each process trained alone and wrote the same run directory (every metrics line and
    checkpoint twice). Launched processes (LOCAL_RANK set) with no accelerator to spread
    over therefore take accelerate's CPU path (gloo), as the variable would; any other
    WORLD_SIZE that differs from the processes accelerate set up is one line naming the fix.
    """
    if mixed_precision == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if cuda_bf16 else "no"
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's and accelerate's
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of "
                        "processes; unset it, or start the run with torchrun or accelerate "
                        "launch") from None
    cpu = world > 1 and "LOCAL_RANK" in os.environ and not torch.accelerator.is_available()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    if world > 1 and accelerator.num_processes != world:
        raise UserError(
            f"WORLD_SIZE={world} says {world} processes, but accelerate set up "
            f"{accelerator.num_processes} on {accelerator.device.type}, so each would train "
            f"alone into the same run directory; launch with `accelerate launch "
            f"--num_processes {world} -m mehldau.cli.train ...` (--cpu without GPUs) or "
            f"`ACCELERATE_USE_CPU=true torchrun --nproc_per_node {world} -m mehldau.cli.train "
            f"...`, or unset WORLD_SIZE to train in one process")
    return accelerator


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_factor(step: int, cfg: TrainConfig, anchor: tuple[int, float] | None = None) -> float:
    """The learning rate after `step` optimizer steps, as a multiple of `cfg.lr`: a linear
    warmup from 1/(warmup+1) to 1, then a cosine down to `min_lr_ratio` at `max_steps` (the
    values of torch's LinearLR + CosineAnnealingLR, in closed form so they are a function of
    the step alone). `anchor=(s0, f0)`: after a resume that changed `max_steps`, the cosine
    starts from the factor `f0` the run had reached at step `s0`, so the rate goes on falling
    from where it was instead of jumping to the new curve."""
    warmup = max(min(cfg.warmup_steps, cfg.max_steps - 1), 0)
    if step < warmup:
        start = 1.0 / (warmup + 1)
        return start + (1.0 - start) * step / warmup
    s0, f0 = anchor if anchor is not None else (warmup, 1.0)
    span = max(cfg.max_steps - s0, 1)
    done = min(max(step - s0, 0), span)
    return cfg.min_lr_ratio + (f0 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done / span))


def _schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int = 0,
              anchor: tuple[int, float] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` as a torch scheduler, positioned at `step` (a resumed optimizer carries
    each group's `initial_lr`).

    torch's own scheduler, not transformers': importing transformers' scheduler pulls in
    peft and bitsandbytes, about 6 s on every `mehldau-train` start.
    """
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lambda k: lr_factor(k, cfg, anchor), last_epoch=step - 1)


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Labelled steps in a batch whose `labels` are (B, L, ...): a compound step with several
    attribute labels counts once, as the loss is per step (nats/event), not per attribute."""
    labels = batch["labels"]
    return int((labels != IGNORE_INDEX).reshape(*labels.shape[:2], -1).any(-1).sum())


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, accelerator: Accelerator,
             batch_size: int, max_batches: int = 0,
             count: Callable[[dict[str, torch.Tensor]], int] = count_targets,
             micro_batch_size: int | str | None = None) -> float:
    """Mean cross-entropy in nats per labelled token over the dataset's windows; each batch
    goes through in pieces of `micro_batch_size` rows (what the memory plan found fits a
    training step, so it fits a forward without gradients)."""
    was_training = model.training
    model.eval()
    total, seen = 0.0, 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=_own_generator())
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        for part in _micro_batches(batch, micro_batch_size):
            part = {k: v.to(accelerator.device) for k, v in part.items()}
            n = count(part)
            if n == 0:
                continue
            with accelerator.autocast():
                loss = model(**part).loss
            total += float(loss) * n
            seen += n
    model.train(was_training)
    return total / max(seen, 1)


def fit(
    model: torch.nn.Module,
    train_ds: Dataset,
    val_ds: Dataset | None,
    cfg: TrainConfig,
    run_dir: str | Path,
    meta: dict[str, Any],
    write_extra: Callable[[Path], None] | None = None,
    logger: Any = None,
    accelerator: Accelerator | None = None,
    make_optimizer: Callable[[torch.nn.Module, TrainConfig], torch.optim.Optimizer] | None = None,
    write_weights: Callable[[torch.nn.Module, Path], None] | None = None,
    read_weights: Callable[[torch.nn.Module, Path], None] | None = None,
    loss_unit: str = "nats/token",
    count: Callable[[dict[str, torch.Tensor]], int] = count_targets,
) -> dict[str, float]:
    """Train `model` for `cfg.max_steps` optimizer steps; returns the last metrics.

    Only parameters with `requires_grad` are optimized (a LoRA run passes a frozen base).
    `write_weights`/`read_weights` replace the full-weights file in checkpoints and on
    resume; `make_optimizer` replaces AdamW (QLoRA's paged 8-bit AdamW on CUDA).
    """
    run_dir = Path(run_dir)
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    logger = logger or NullLogger()
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    if cfg.activation_checkpointing and not set_activation_checkpointing(model, True):
        raise UserError(f"{type(model).__name__} has no blocks to checkpoint; drop "
                        "train.activation_checkpointing")
    optimizer = (make_optimizer or _optimizer)(model, cfg)
    step, anchor = 0, None
    main = accelerator.is_main_process
    if cfg.resume:
        if main:
            _remove_unfinished_checkpoints(run_dir)
        accelerator.wait_for_everyone()
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None or not (ckpt / "trainer_state.pt").is_file():
            if main:
                print(f"train: no checkpoint to resume in {run_dir}; starting fresh",
                      file=sys.stderr)
        else:
            step, anchor = _restore(ckpt, model, optimizer, cfg, read_weights)
            if main:
                metrics.truncate_after(step)
                print(f"train: resumed from {ckpt} at step {step}", file=sys.stderr)
    else:
        set_seed(cfg.seed)
    scheduler = _schedule(optimizer, cfg, step, anchor)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = cfg.batch_size * cfg.grad_accum * world
    sampler = CounterSampler(start=step * per_step, rank=rank, world=world)
    batches = iter(DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler,
                              generator=_own_generator()))

    def checkpoint() -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"step": step, "optimizer": optimizer.state_dict(),
                     "schedule": {"max_steps": cfg.max_steps,
                                  "anchor": list(anchor) if anchor is not None else None},
                     "torch_rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                     else None}
            save_checkpoint(run_dir, step, accelerator.unwrap_model(model), meta, write_extra,
                            state, keep_last=cfg.keep_last, write_weights=write_weights)

    def record(rec: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            metrics.write(rec)
            logger.log(rec, rec["step"])

    last: dict[str, float] = {}
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step",
               disable=not accelerator.is_main_process or None, dynamic_ncols=True)
    loss_sum, tok_sum, t0 = 0.0, 0, time.perf_counter()
    saved_at = step
    with _deferred_interrupt() as interrupted:
        while step < cfg.max_steps:
            if _everyone(accelerator, interrupted()):
                # Ctrl-C waited for the step in flight, so the state is whole: keep it.
                if step > saved_at:
                    checkpoint()
                bar.close()
                print(f"train: interrupted at step {step}; checkpoint saved, continue with "
                      "train.resume=true", file=sys.stderr)
                raise KeyboardInterrupt
            for accum in range(cfg.grad_accum):
                batch = {k: v.to(accelerator.device) for k, v in next(batches).items()}
                parts = _micro_batches(batch, cfg.micro_batch_size)
                targets = [count(p) for p in parts]
                for i, (part, n) in enumerate(zip(parts, targets)):
                    # Each micro-batch's mean loss weighted by its share of the batch's
                    # targets: the sum is the whole batch's mean loss, whatever the split.
                    weight = n / max(sum(targets), 1) if len(parts) > 1 else 1.0
                    sync = accum == cfg.grad_accum - 1 and i == len(parts) - 1
                    ctx = accelerator.no_sync(model) if not sync else nullcontext()
                    with ctx, accelerator.autocast():
                        loss = model(**part).loss * weight
                        accelerator.backward(loss / cfg.grad_accum)
                    loss_sum += float(loss.detach()) / cfg.grad_accum
                tok_sum += sum(targets)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
                if world > 1:  # every process's loss and targets, not the main one's alone
                    total = accelerator.reduce(
                        torch.tensor([loss_sum, tok_sum], dtype=torch.float64,
                                     device=accelerator.device), "sum")
                    loss_sum, tok_sum = float(total[0]) / world, int(total[1])
                dt = time.perf_counter() - t0
                train_loss = loss_sum / n
                if not math.isfinite(train_loss):
                    raise RuntimeError(f"training loss became {train_loss} at step {step}")
                last = {"step": step, "split": "train", "loss": round(train_loss, 5),
                        "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(tok_sum / dt, 1)}
                record(last)
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_sum / dt:.0f}")
                loss_sum, tok_sum, t0 = 0.0, 0, time.perf_counter()
            if val_ds is not None and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                val = evaluate(model, val_ds, accelerator, cfg.eval_batch_size,
                               cfg.eval_max_batches, count, cfg.micro_batch_size)
                record({"step": step, "split": "val", "loss": round(val, 5)})
                last["val_loss"] = val
                if main:
                    bar.write(f"step {step}: val loss {val:.4f} {loss_unit}")
                t0 = time.perf_counter()  # keep eval time out of tokens/s
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
                checkpoint()
                saved_at, t0 = step, time.perf_counter()
    bar.close()
    return last


def _micro_batches(batch: dict[str, torch.Tensor], size: int | None
                   ) -> list[dict[str, torch.Tensor]]:
    """The batch cut along its first axis into pieces of `size` rows (the last may be
    smaller); the whole batch as one piece when `size` is None or not smaller."""
    rows = len(next(iter(batch.values())))
    if not isinstance(size, int) or size >= rows:  # None (or an unresolved "auto"): whole
        return [batch]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, rows, size)]


def _everyone(accelerator: Accelerator, flag: bool) -> bool:
    """`flag` if any process raised it: with several processes, all stop at the same step,
    or the checkpoint's barrier would wait forever for the ones that went on."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device),
                                   "sum").item())


@contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """While training, the first Ctrl-C (SIGINT) is noted rather than raised, so the loop can
    finish its step, checkpoint and stop; a second one interrupts at once. Outside the main
    thread (where signals cannot be caught) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hits: list[int] = []

    def note(signum: int, frame: Any) -> None:
        hits.append(signum)
        if len(hits) > 1:
            raise KeyboardInterrupt
        print("\ntrain: interrupt: finishing this step, then saving a checkpoint (Ctrl-C "
              "again to stop at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


def _remove_unfinished_checkpoints(run_dir: Path) -> None:
    """Temp directories of checkpoints a killed run was writing (never picked up, as they
    are not named step_*): removed on resume, with a line saying so."""
    root = run_dir / "checkpoints"
    for tmp in sorted(root.glob(".step_*.tmp-*")) if root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"train: removed {tmp.name}, a checkpoint a stopped run did not finish",
              file=sys.stderr)


def _own_generator() -> torch.Generator:
    """A DataLoader draws a seed from the global RNG when iterated unless given a generator;
    that draw would shift dropout's random stream and break exact resume."""
    return torch.Generator().manual_seed(0)


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """trainer_state.pt with torch's weights-only unpickler: tensors and plain values load, a
    pickle that would build any other object (and so could run code) is refused."""
    path = ckpt / "trainer_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} holds objects other than tensors and plain values, so it was "
                        "not written by mehldau-train and could run code; refusing to load it "
                        "(resume a run of your own, or start fresh)") from e


def _restore(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             cfg: TrainConfig, read_weights: Callable[[torch.nn.Module, Path], None] | None
             ) -> tuple[int, tuple[int, float] | None]:
    """Weights, optimizer and RNG state of `ckpt`; returns its step and the schedule's anchor
    (see `lr_factor`), moved when `cfg.max_steps` differs from the checkpoint's."""
    from safetensors.torch import load_file

    state = load_trainer_state(ckpt)
    if read_weights is not None:
        read_weights(model, ckpt)
    else:
        model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    step = int(state["step"])
    saved = state.get("schedule") or {}
    anchor = tuple(saved["anchor"]) if saved.get("anchor") else None
    before = int(saved.get("max_steps", cfg.max_steps))
    if before != cfg.max_steps:
        if step >= cfg.max_steps:
            raise UserError(f"the run is at step {step}, past train.max_steps={cfg.max_steps}; "
                            f"raise train.max_steps to train on")
        old = replace(cfg, max_steps=before)
        factor = lr_factor(step, old, anchor)
        anchor = (step, factor) if step >= min(cfg.warmup_steps, before - 1) else None
        print(f"train: max_steps {before} -> {cfg.max_steps}: the learning rate goes on from "
              f"{cfg.lr * factor:.3g} at step {step} and decays by cosine to "
              f"{cfg.lr * cfg.min_lr_ratio:.3g} at step {cfg.max_steps}", file=sys.stderr)
    return step, anchor
