"""A memory plan before the first step: what training will hold (weights, gradients,
optimizer state, activations) against what the device has, so a setting that cannot fit is
refused in one line that says which settings would, instead of a silent kill minutes later.

Weights, gradients and the optimizer's state are counted from the model (and, when adapting,
the adapter's ranks and targets). Activations are measured: forwards of the branch's own
training item, built from a made-up piece rather than the corpus (so this runs before any
data is read), with a hook that adds up every tensor autograd keeps for the backward pass;
that is what grows with the micro-batch. The hook counts and keeps nothing, so a probe
holds no more than a forward without autograd. A model built of equal blocks (the
Transformers) is only probed whole with checkpointing on; the model cut to one and to two
blocks gives what each plain block keeps, and what the largest recomputation (a block, or
a head not kept) holds on top of the checkpointed figure during the backward pass. A model
whose layers differ (the VQ-VAE's conv stack) is probed whole, plain, with each layer's
share measured for its recomputation. The probes run under `torch.random.fork_rng` and
restore every buffer (the VQ-VAE's EMA codebook moves in a training forward), so they
change nothing in the run.

A plan is an estimate, on the safe side where blocks differ (Perceiver AR's cross-attention
layer stands for all its layers): allocator slack, temporary buffers and the gradients of
a recomputed block are covered by a 20 % margin, not measured (checkpointed steps measured
on CPU peaked up to 1.2x the unmargined estimate). What the process already holds beside
the model (the CUDA context, or the interpreter and libraries) is measured and added.
`train.memory_budget_gb` sets the budget; by default it is the CUDA device's memory, or on
a CPU what the process holds plus MemAvailable."""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from itertools import chain

import torch
import torch.nn as nn

from mehldau.adapters.lora import is_target
from mehldau.errors import UserError
from mehldau.nn.checkpointing import set_activation_checkpointing

GiB = 1024**3
MARGIN = 1.2  # allocator slack, temporaries, a recomputed block's gradients


@dataclass
class MemoryPlan:
    weights: int  # bytes
    gradients: int
    optimizer: int
    activations_per_row: int  # kept for backward by one training row, as configured
    rows: int  # per forward/backward (the micro-batch)
    runtime: int = 0  # held already beside the model: the CUDA context, or the interpreter

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def total(self, rows: int | None = None, activations_per_row: int | None = None) -> int:
        per_row = self.activations_per_row if activations_per_row is None else activations_per_row
        return int(MARGIN * (self.static + per_row * (self.rows if rows is None else rows))
                   + self.runtime)


def budget_bytes(device: torch.device, gigabytes: float | None) -> int:
    """`train.memory_budget_gb`, else the CUDA device's memory, else what this process may
    hold on a CPU machine: what it holds (the model already loaded) plus MemAvailable."""
    if gigabytes is not None:
        return int(gigabytes * GiB)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    available = _kib("/proc/meminfo", "MemAvailable:")
    return 1 << 62 if available is None else available + (_kib("/proc/self/status", "VmRSS:")
                                                          or 0)


def _kib(path: str, key: str) -> int | None:
    """A `key: N kB` line of a /proc file, in bytes (None where there is no such file)."""
    try:
        with open(path) as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def runtime_bytes(model: nn.Module, device: torch.device) -> int:
    """What the process holds on `device` beside the model's tensors: on CUDA the context
    (and any other process: total - free - what torch has reserved), on a CPU the resident
    set less the model's tensors there (the interpreter and the libraries)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return max(total - free - torch.cuda.memory_reserved(device), 0)
    rss = _kib("/proc/self/status", "VmRSS:")
    if rss is None:
        return 0
    own = sum(t.numel() * t.element_size() for t in chain(model.parameters(), model.buffers())
              if t.device.type == "cpu")
    return max(rss - own, 0)


def give_back() -> None:
    """Return freed memory to the system: Python's unreachable cycles, CUDA's cached blocks,
    and on glibc the heap pages freed tensors leave behind. On a CPU those pages would stay
    resident and count against the budget as if still used: the fp32 weights QLoRA has just
    quantized, or the probes' forwards. No library call does the last part, hence ctypes."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor],
                autocast: Callable = nullcontext, units: list[nn.Module] = ()
                ) -> tuple[int, int]:
    """Bytes of the tensors autograd keeps for the backward pass of one training forward,
    and the most that one of `units` (modules called in turn) keeps of them."""
    total = largest = 0

    # The hook counts what would be kept and keeps nothing: the probe never runs backward,
    # and returning the tensor itself would tie an output saved by its own node (exp,
    # sigmoid, ...) into a reference cycle autograd never frees, leaking every probe's
    # activations.
    def keep(t: torch.Tensor) -> None:
        nonlocal total
        total += t.numel() * t.element_size()

    def never(_: None) -> torch.Tensor:
        raise RuntimeError("the memory probe's forward has no backward")

    def start(module: nn.Module, args) -> None:
        module._memory_plan_start = total

    def end(module: nn.Module, args, out) -> None:
        nonlocal largest
        largest = max(largest, total - module.__dict__.pop("_memory_plan_start", total))

    hooks = [h for u in units for h in (u.register_forward_pre_hook(start),
                                       u.register_forward_hook(end))]
    was = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), torch.autograd.graph.saved_tensors_hooks(
                keep, never), autocast():
            model(**batch)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return total, largest


def lora_parameters(model: nn.Module, targets: list[str], rank: int) -> int:
    """Parameters LoRA adds: rank x (in + out) for each targeted Linear (or Embedding)."""
    n = 0
    for name, m in model.named_modules():
        if is_target(name, targets):
            if isinstance(m, nn.Linear):
                n += rank * (m.in_features + m.out_features)
            elif isinstance(m, nn.Embedding):
                n += rank * (m.num_embeddings + m.embedding_dim)
    return n


def plan(model: nn.Module, probe: Callable[[int], dict[str, torch.Tensor]], rows: int,
         checkpointing: bool, adapter=None, device: torch.device | None = None,
         autocast: Callable = nullcontext) -> MemoryPlan:
    """The plan for training `model` on micro-batches of `rows` rows; `probe(n)` gives a
    training batch of n rows (on the model's device), `adapter` an AdapterConfig or None."""
    device = device or next(model.parameters()).device
    params = list(model.parameters())
    if adapter is None:
        weights = sum(p.numel() * p.element_size() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
    else:
        trainable = lora_parameters(model, adapter.target_modules(model), adapter.r)
        weights = sum(p.numel() * p.element_size() for p in params) + 4 * trainable
        if adapter.kind == "qlora":  # NF4: half a byte a weight + one fp32 scale per block
            linear = sum(m.weight.numel() for n, m in model.named_modules()
                         if isinstance(m, nn.Linear) and not n.endswith("lm_head"))
            weights -= int(linear * (4 - 0.5 - 4 / 64))
    paged_8bit = adapter is not None and adapter.kind == "qlora" and device.type == "cuda"
    optimizer = trainable * (2 if paged_8bit else 8)
    batch = probe(1)
    stack = _block_stack(model)
    # A training forward moves state some models keep in buffers (the VQ-VAE's EMA codebook
    # and its first-batch init): the probes must leave the model as they found it.
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        if not set_activation_checkpointing(model, True):
            per_row = saved_bytes(model, batch, autocast)[0]  # nothing to recompute
        elif stack is None:
            # Layers that differ (a conv stack's resolutions): the whole model, small enough
            # to probe plain; checkpointed, plus the largest layer's recomputation.
            set_activation_checkpointing(model, False)
            plain, largest = saved_bytes(model, batch, autocast, _units(model))
            set_activation_checkpointing(model, True)
            per_row = saved_bytes(model, batch, autocast)[0] + largest if checkpointing \
                else plain
        else:
            # Never the whole model unchecked (that probe could itself run out of memory): the
            # whole model checkpointed, and the model cut to one and to two blocks.
            whole = saved_bytes(model, batch, autocast)[0]
            parent, name, blocks = stack
            cut = {}
            try:
                for n in (1, 2):
                    setattr(parent, name, nn.ModuleList(list(blocks)[:n]))
                    for recompute in (True, False):
                        set_activation_checkpointing(model, recompute)
                        cut[n, recompute] = saved_bytes(model, batch, autocast)[0]
            finally:
                setattr(parent, name, blocks)
            block = max(cut[2, False] - cut[1, False], 0)  # what one more plain block keeps
            if checkpointing:  # plus the largest recomputation: a block, or an unkept head
                per_row = whole + max(cut[1, False] - cut[1, True], block)
            else:
                per_row = cut[1, False] + (len(blocks) - 1) * block
    finally:
        with torch.no_grad():
            for b, was in buffers:
                b.copy_(was)
    set_activation_checkpointing(model, checkpointing)
    give_back()
    return MemoryPlan(weights, 4 * trainable, optimizer, per_row, rows,
                      runtime_bytes(model, device))


def _units(model: nn.Module) -> list[nn.Module]:
    """The layers a checkpointing module recomputes one at a time: the children of its
    layer containers."""
    return [layer for m in model.modules() if hasattr(m, "activation_checkpointing")
            for c in m.children() if isinstance(c, nn.Sequential | nn.ModuleList)
            for layer in c]


def _block_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList] | None:
    """(parent, attribute, blocks) of the model's longest stack of blocks, if any."""
    best = None
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) > 1 and (
                    best is None or len(child) > len(best[2])):
                best = (parent, name, child)
    return best


def check(p: MemoryPlan, budget: int, batch_size: int, checkpointing: bool, adapter,
          auto: bool) -> int:
    """The micro-batch size to train with (`auto`: the largest that fits), after printing the
    plan in one line; a `UserError` naming settings that would fit when none does."""
    rows = p.rows
    if auto:
        fits = [r for r in range(batch_size, 0, -1) if p.total(r) <= budget]
        rows = fits[0] if fits else 1
        p = replace(p, rows=rows)
    need = p.total()
    line = (f"{_size(need)} of {_size(budget)} (weights {_size(p.weights)}, gradients "
            f"{_size(p.gradients)}, optimizer {_size(p.optimizer)}, activations "
            f"{_size(p.activations_per_row * rows)} for {rows} row{'s' if rows > 1 else ''}, "
            f"+{round(100 * (MARGIN - 1))} %, runtime {_size(p.runtime)})")
    if need <= budget:
        print(f"memory plan: {line}" + (f"; micro_batch_size=auto chose {rows}" if auto
                                        else ""), file=sys.stderr)
        return rows
    ways = []
    smaller = [r for r in range(rows - 1, 0, -1) if p.total(r) <= budget]
    if smaller:
        ways.append(f"train.micro_batch_size={smaller[0]}")
    if not checkpointing:
        ways.append("train.activation_checkpointing=true")
    if adapter is not None and adapter.kind == "lora":
        ways.append("adapter=qlora")
    ways.append("a shorter context (model.max_seq_len or model.context_len)")
    raise UserError(f"this run does not fit: it needs {line}, the budget being "
                    f"train.memory_budget_gb or the device's memory; try "
                    f"{', or '.join(ways)}")


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"
