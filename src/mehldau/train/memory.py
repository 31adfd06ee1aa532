"""A memory plan before the first step: what training will hold (weights, gradients,
optimizer state, activations) against what the device has, so a setting that cannot fit is
refused in one line that says which settings would, instead of a silent kill minutes later.

Weights, gradients and the optimizer's state are counted from the model (and, when adapting,
the adapter's ranks and targets). Activations are measured: forwards of the branch's own
training item, built from a made-up piece rather than the corpus (so this runs before any
data is read), with a hook that adds up the memory autograd keeps for the backward pass.
Each storage is counted once (an input saved by q, k and v is one tensor), and the model's
own parameters and buffers never: a weight saved for its backward pass is held anyway, and
counting it (times the rows, as this plan once did) made a model with large layers look
as if each row cost all its weights. What grows with the micro-batch is the difference
between probes of two rows and of one; the rest (autocast's bf16 copies of the weights,
tables built from them) is kept once a step. The hook counts and keeps nothing, so a probe
holds no more than a forward without autograd. A model built of equal blocks (the
Transformers) is only probed whole with checkpointing on; the model cut to one and to two
blocks gives what each plain block keeps, and what the largest recomputation (a block, or
a head not kept) holds on top of the checkpointed figure during the backward pass. A model
whose layers differ (the VQ-VAE's conv stack) is probed whole, plain, with each layer's
share measured for its recomputation. The probes run under `torch.random.fork_rng` and
restore every buffer (the VQ-VAE's EMA codebook moves in a training forward), so they
change nothing in the run.

The peak is weights + optimizer state + the larger of two phases. The forward/backward:
the activations, plus the gradient of the largest tensor kept (the backward pass starts at
the loss, where the largest tensors are, and holds that gradient beside everything kept),
plus the gradients only when a step accumulates several micro-batches (the trainer frees
them after each step, and the backward pass frees activations as it makes them). The
optimizer step: the gradients and the step's own temporaries (`step_transient`: one fp32
copy of the parameters with torch's foreach AdamW on CUDA, two of the largest parameter with
its per-parameter path elsewhere). Counting the gradients beside the activations, as this
plan once did, put scg's DiT at 0.8x of its measured peak.

On a CPU the resident set, not the live tensors, is what the kernel kills for. glibc keeps
freed activations in its heap once its mmap threshold has risen, so a step held up to twice
its live tensors (scg's autoencoder: 312 MB measured against 156 MB planned); the plan
fixes that threshold (`hand_back_freed_blocks`) for the process that trains, rather than
widening its margin. Checked against reality by `benchmarks/memory.py --branches` and
`tests/test_memory.py`: every branch, tiny and larger, whole-process peak/plan within
0.8-1.3 on a CPU, and for the larger settings the peak's growth over the resident set
before the model against the plan less its runtime too (a tiny preset's few MB of model
drown in the ~100 MB of library code its first steps make resident).

A plan is an estimate, on the safe side where blocks differ (Perceiver AR's cross-attention
layer stands for all its layers): the backward pass's gradients of activations, allocator
slack and a recomputed block's gradients are covered by a 20 % margin, not measured. What
the process already holds beside the model (the CUDA context, or the interpreter and the
library code the probes made resident) is measured and added.
`train.memory_budget_gb` sets the budget; by default it is the CUDA device's memory, or on
a CPU what the process holds plus MemAvailable."""

from __future__ import annotations

import ctypes
import gc
import sys
import weakref
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
    activations_fixed: int = 0  # kept for backward once a step, whatever the rows
    step_transient: int = 0  # the optimizer step's temporaries, after the backward pass
    step_rows: int = 0  # rows an optimizer step takes in this process (0: unknown)

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def activations(self, rows: int | None = None) -> int:
        return self.activations_fixed + self.activations_per_row * (
            self.rows if rows is None else rows)

    def total(self, rows: int | None = None) -> int:
        """The peak: weights and optimizer state throughout, and on top the larger of the
        forward/backward's activations and the gradients with the optimizer step's
        temporaries. The trainer frees the gradients after each step (`set_to_none`), and
        the backward pass frees activations as it makes gradients, so the two meet only
        when a step accumulates several micro-batches: the earlier ones' gradients wait
        beside the next one's activations."""
        rows = self.rows if rows is None else rows
        waiting = self.gradients if not self.step_rows or rows < self.step_rows else 0
        return int(MARGIN * (self.weights + self.optimizer + max(
            waiting + self.activations(rows), self.gradients + self.step_transient))
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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def hand_back_freed_blocks() -> None:
    """On glibc, give every freed block of 128 KiB or more straight back to the system.
    By default glibc raises its mmap threshold each time such a block is freed, so later
    activations come from the heap, whose freed middle stays resident: a CPU training step
    then holds up to twice what its tensors ever need at once (measured on every branch,
    `benchmarks/memory.py --branches`), and no plan of tensors can predict that. A fixed
    threshold keeps the resident set within a few percent of the live tensors."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        pass


def saved_bytes(model: nn.Module, batch: dict[str, torch.Tensor],
                autocast: Callable = nullcontext, units: list[nn.Module] = ()
                ) -> tuple[int, int, int]:
    """Bytes of the memory autograd keeps for the backward pass of one training forward,
    the most that one of `units` (modules called in turn) keeps of them, and the largest
    single storage kept. A tensor saved
    several times (one input to q, k and v) or on a storage already saved (views of one
    output) is counted once, with the whole storage it keeps; the model's own parameters
    and buffers are held anyway and never counted."""
    total = largest = biggest = 0
    own = {t.untyped_storage().data_ptr() for t in chain(model.parameters(), model.buffers())}
    # storage -> a weak reference to the tensor it was counted for: while that tensor
    # lives, the storage is the same one; once it is freed, the address may be reused
    live: dict[int, weakref.ref] = {}

    # The hook counts what would be kept and keeps nothing: the probe never runs backward,
    # and returning the tensor itself would tie an output saved by its own node (exp,
    # sigmoid, ...) into a reference cycle autograd never frees, leaking every probe's
    # activations.
    def keep(t: torch.Tensor) -> None:
        nonlocal total, biggest
        try:
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # no plain storage: count the tensor
            total += t.numel() * t.element_size()
            return
        if ptr in own or size == 0:
            return
        seen = live.get(ptr)
        if seen is not None and seen() is not None:
            return
        root = t._base if t._base is not None else t  # a view's base outlives the view
        live[ptr] = weakref.ref(root)
        total += size
        biggest = max(biggest, size)

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
    return total, largest, biggest


def lora_parameters(model: nn.Module, targets: list[str], rank: int) -> int:
    """Parameters LoRA adds: rank x (in + out) for each targeted Linear (or Embedding)."""
    return sum(lora_matrices(model, targets, rank))


def lora_matrices(model: nn.Module, targets: list[str], rank: int) -> list[int]:
    """The sizes of the matrices LoRA adds: rank x in and rank x out for each targeted
    Linear (or Embedding)."""
    sizes = []
    for name, m in model.named_modules():
        if is_target(name, targets):
            if isinstance(m, nn.Linear):
                sizes += [rank * m.in_features, rank * m.out_features]
            elif isinstance(m, nn.Embedding):
                sizes += [rank * m.num_embeddings, rank * m.embedding_dim]
    return sizes


def plan(model: nn.Module, probe: Callable[[int], dict[str, torch.Tensor]], rows: int,
         checkpointing: bool, adapter=None, device: torch.device | None = None,
         autocast: Callable = nullcontext, step_rows: int = 0) -> MemoryPlan:
    """The plan for training `model` on micro-batches of `rows` rows, `step_rows` to an
    optimizer step (batch size x gradient accumulation; 0: unknown, taken as more than one
    micro-batch); `probe(n)` gives a training batch of n rows (on the model's device),
    `adapter` an AdapterConfig or None."""
    device = device or next(model.parameters()).device
    if device.type == "cpu":
        hand_back_freed_blocks()
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
    transient = step_transient(model, adapter, device, paged_8bit)
    stack = _block_stack(model)
    # A training forward moves state some models keep in buffers (the VQ-VAE's EMA codebook
    # and its first-batch init): the probes must leave the model as they found it.
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    kept = []
    # What grows with the rows is the difference between two rows and one; the rest is kept
    # once a step whatever the rows (autocast's low-precision copies of the weights, tables
    # built from them), never multiplied by the rows.
    for n in (1, 2):
        try:
            kept.append(_kept(model, probe(n), autocast, checkpointing, stack))
        finally:
            with torch.no_grad():
                for b, was in buffers:
                    b.copy_(was)
    one, two = kept
    per_row = max(two - one, 0)
    fixed = max(one - per_row, 0)
    set_activation_checkpointing(model, checkpointing)
    _load_step_code()
    give_back()
    return MemoryPlan(weights, 4 * trainable, optimizer, per_row, rows,
                      runtime_bytes(model, device), fixed, transient, step_rows)


def step_transient(model: nn.Module, adapter, device: torch.device, paged_8bit: bool) -> int:
    """What AdamW's step allocates on top of weights, gradients and its state, the
    activations being freed by then. torch's AdamW takes its foreach path where every
    parameter is on CUDA (the trainer leaves `foreach` to torch): `_foreach_sqrt` of the
    second moments is one fp32 copy of the param group (the trainer's larger group, the
    matrices, is nearly all of it). Elsewhere it steps one parameter at a time, and
    `exp_avg_sq.sqrt() / bias_correction` holds two copies of that parameter. bitsandbytes'
    paged 8-bit AdamW updates in place, in one kernel."""
    if paged_8bit:
        return 0
    if adapter is None:
        sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    else:
        sizes = lora_matrices(model, adapter.target_modules(model), adapter.r)
    if not sizes:
        return 0
    if device.type == "cuda":
        return 4 * sum(sizes)
    return 2 * 4 * max(sizes)


def _load_step_code() -> None:
    """Load what a training step loads beyond the probes' forwards, so that the runtime
    measured next holds it: torch's optimizers import torch._dynamo and more on first use,
    about 70 MB resident on a CPU that the plan's runtime once missed (scg's tiny
    autoencoder measured 1.4x its planned model part). A step on one throwaway number."""
    x = torch.zeros(1, requires_grad=True)
    (2 * x).sum().backward()
    nn.utils.clip_grad_norm_([x], 1.0)
    torch.optim.AdamW([x]).step()


def _kept(model: nn.Module, batch: dict[str, torch.Tensor], autocast: Callable,
          checkpointing: bool, stack: tuple[nn.Module, str, nn.ModuleList] | None) -> int:
    """What a training forward on `batch` keeps for the backward pass, as configured (with
    checkpointing, plus the largest recomputation the backward pass holds on top), and the
    gradient of the largest tensor kept: the backward pass starts at the loss, where the
    largest tensors are (the logits' log-softmax), and holds that gradient beside them all
    (Moonbeam's seven 2,341-way heads: measured peaks 1.5x what was kept without it)."""
    biggest = 0

    def saved(units: list[nn.Module] = ()) -> tuple[int, int]:
        nonlocal biggest
        total, largest, big = saved_bytes(model, batch, autocast, units)
        biggest = max(biggest, big)
        return total, largest

    if not set_activation_checkpointing(model, True):
        return saved()[0] + biggest  # nothing to recompute
    if stack is None:
        # Layers that differ (a conv stack's resolutions): the whole model, small enough to
        # probe plain; checkpointed, plus the largest layer's recomputation.
        set_activation_checkpointing(model, False)
        plain, largest = saved(_units(model))
        if not checkpointing:
            return plain + biggest
        set_activation_checkpointing(model, True)
        return saved()[0] + largest + biggest
    # Never the whole model unchecked (that probe could itself run out of memory): the whole
    # model checkpointed, and the model cut to one and to two blocks.
    whole = saved()[0]
    parent, name, blocks = stack
    cut = {}
    try:
        for n in (1, 2):
            setattr(parent, name, nn.ModuleList(list(blocks)[:n]))
            for recompute in (True, False):
                set_activation_checkpointing(model, recompute)
                cut[n, recompute] = saved()[0]
    finally:
        setattr(parent, name, blocks)
    block = max(cut[2, False] - cut[1, False], 0)  # what one more plain block keeps
    if checkpointing:  # plus the largest recomputation: a block, or an unkept head
        return whole + max(cut[1, False] - cut[1, True], block) + biggest
    return cut[1, False] + (len(blocks) - 1) * block + biggest

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
            f"{_size(p.activations(rows))} for {rows} row{'s' if rows > 1 else ''}, "
            f"optimizer step {_size(p.step_transient)}, +{round(100 * (MARGIN - 1))} %, "
            f"runtime {_size(p.runtime)})")
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
