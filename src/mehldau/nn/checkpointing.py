"""Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
Cost", arXiv 1604.06174): a block's activations are not kept for the backward pass but
recomputed from its input, trading about one more forward for memory that no longer grows
with depth. torch's non-reentrant `torch.utils.checkpoint` does the work; it restores the RNG
state for the recomputation, so dropout draws the same masks and the gradients equal the
plain path's, and it needs no input that requires grad (a frozen LoRA/QLoRA base is fine).

Every model marks the modules whose calls may be checkpointed with an
`activation_checkpointing` attribute and routes those calls through `run`;
`set_activation_checkpointing` switches them all (`train.activation_checkpointing=true`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def run(enabled: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`; with `enabled` (and autograd recording), its activations are recomputed
    in the backward pass instead of stored."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Switch checkpointing on every module of `model` (a peft wrapper included) that
    supports it; returns how many modules that is."""
    found = 0
    for module in model.modules():
        if hasattr(module, "activation_checkpointing"):
            module.activation_checkpointing = enabled
            found += 1
    return found
