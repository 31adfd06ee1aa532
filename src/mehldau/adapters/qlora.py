"""QLoRA (Dettmers et al. 2023, arXiv 2305.14314): the frozen base in 4-bit NF4 with double
quantization (bitsandbytes), LoRA on top (lora.py), a paged 8-bit AdamW on CUDA.

transformers' `BitsAndBytesConfig` only quantizes Hugging Face models loaded with
`from_pretrained`; our models are plain modules, so this file swaps their `nn.Linear` layers
for `bnb.nn.Linear4bit` itself. On CPU (CI, development) it runs in fp32 with a plain AdamW,
and applies the workaround for bitsandbytes' CPU repacking bug: after an eval-mode no-grad
forward, `Linear4bit` permanently repacks its weight into a layout whose kernel has no
autograd, silently dropping gradients; we switch that repacking off (see
docs/implementation_notes.md, "bitsandbytes on CPU").
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mehldau.errors import UserError

# The output head stays in full precision, as QLoRA keeps it (and peft's kbit preparation).
KEEP_FULL_PRECISION = ("lm_head",)


def import_bnb():
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library
        # A native-library failure can span many lines; a UserError is printed as one.
        reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise UserError(f"adapter=qlora needs bitsandbytes, which cannot load here ({reason}); "
                        "use adapter=lora or install bitsandbytes for this platform") from e
    return bnb


def quantize_4bit(model: nn.Module, compute_dtype: torch.dtype, device: torch.device | str,
                  skip: tuple[str, ...] = KEEP_FULL_PRECISION) -> nn.Module:
    """Replace every `nn.Linear` (but `skip`) by a frozen NF4 `Linear4bit`, in place."""
    bnb = import_bnb()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or name in skip:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                  bias=child.bias is not None, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(child.weight.data.detach().float().cpu(),
                                         requires_grad=False, compress_statistics=True,
                                         quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.detach().clone(), requires_grad=False)
            # Quantization happens on the move; CPU layers must be moved explicitly too,
            # or the first forward fails ("FP4 quantization state not initialized").
            setattr(parent, name, q.to(device))
    disable_cpu_repack(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def disable_cpu_repack(model: nn.Module) -> None:
    """The CPU workaround: never repack 4-bit weights into the autograd-less layout."""
    bnb = import_bnb()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def dequantized_copy(model: nn.Module) -> nn.Module:
    """A plain-`nn.Linear` copy with the 4-bit weights dequantized: the fp32 reference."""
    import copy

    bnb = import_bnb()
    ref = copy.deepcopy(model)
    for _, parent in list(ref.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                lin.weight = nn.Parameter(w.float(), requires_grad=False)
                if child.bias is not None:
                    lin.bias = nn.Parameter(child.bias.data.float(), requires_grad=False)
                setattr(parent, name, lin.to(w.device))
    return ref


@torch.no_grad()
def nf4_round_trip(model: nn.Module, skip: tuple[str, ...] = KEEP_FULL_PRECISION) -> nn.Module:
    """Every `nn.Linear` weight (but `skip`) replaced, in place, by its NF4 quantization
    dequantized again: the weights a QLoRA adapter was trained against, as plain fp32
    layers. Loading an adapter onto this, rather than onto the unquantized base, makes
    generate and merge compute what training computed (without bitsandbytes at run time)."""
    bnb = import_bnb()
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.Linear) and name not in skip:
                w = child.weight.data
                q, state = bnb.functional.quantize_4bit(
                    w.detach().float().cpu(), blocksize=64, compress_statistics=True,
                    quant_type="nf4")
                child.weight.data = bnb.functional.dequantize_4bit(q, state).to(w.device, w.dtype)
    return model


def make_optimizer(params, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device | str) -> torch.optim.Optimizer:
    """Paged 8-bit AdamW on CUDA (QLoRA's memory-spike insurance); plain AdamW on CPU."""
    if torch.device(device).type == "cuda":
        bnb = import_bnb()
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay, betas=betas)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
