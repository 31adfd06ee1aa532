"""LoRA (Hu et al. 2021, arXiv 2106.09685) on the project's own modules, through peft.

Model-agnostic: any branch whose layers use the Llama names (`q_proj` ... `o_proj`,
`gate_proj`/`up_proj`/`down_proj`, `embed_tokens`, `lm_head`) is adapted the same way. An
adapter checkpoint holds peft's files (`adapter_config.json`, `adapter_model.safetensors`)
plus `base.json`: the base checkpoint's path and the sha256 of its weights, so loading can
refuse an adapter whose base changed on disk.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from mehldau.errors import UserError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN = ("gate_proj", "up_proj", "down_proj")
EMBEDDINGS = ("embed_tokens", "lm_head")
ADAPTER_DIR = "adapter"
BASE_POINTER = "base.json"


@dataclass
class AdapterConfig:
    kind: str = "lora"  # "lora" or "qlora" (the frozen base in 4-bit NF4, see qlora.py)
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(ATTENTION))
    ffn: bool = False  # also adapt the feed-forward projections
    embeddings: bool = False  # also adapt the input embedding and the output head

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "qlora"):
            raise UserError(f"unknown adapter '{self.kind}'; use adapter=lora or adapter=qlora")
        if self.r <= 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise UserError(f"adapter needs r > 0, alpha > 0, 0 <= dropout < 1; got r={self.r}, "
                            f"alpha={self.alpha}, dropout={self.dropout}")

    def target_modules(self) -> list[str]:
        names = list(self.targets)
        if self.ffn:
            names += [n for n in FFN if n not in names]
        if self.embeddings:
            names += [n for n in EMBEDDINGS if n not in names]
        return names


def apply_lora(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Freeze `model` and wrap the target modules with LoRA; returns peft's `PeftModel`."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in cfg.target_modules() if t in present]
    if not targets:
        raise UserError(f"none of the adapter targets {cfg.target_modules()} exist in "
                        f"{type(model).__name__}")
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=targets, bias="none")
    return get_peft_model(model, lora)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights counted by their real size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if getattr(p, "quant_state", None) is not None:  # bnb Params4bit: two values per byte
            n = int(p.quant_state.shape.numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime): every checkpoint of an adapter run
    records its base's hash, and a released Moonbeam base is over a gigabyte."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _base_file(base: Path, base_weights: str) -> Path:
    """The file whose hash identifies a base: its weights file, or the base itself when it is
    a single file (`init=FILE`, e.g. a released Moonbeam .pt)."""
    return base if base.is_file() else base / base_weights


def save_adapter(model: nn.Module, ckpt_dir: Path, base_ckpt: Path, base_weights: str) -> None:
    """peft's adapter files into `ckpt_dir/adapter`, and the base pointer beside them."""
    # LoRA on an embedding never resizes it: no need for peft to store the whole table.
    model.save_pretrained(str(ckpt_dir / ADAPTER_DIR), save_embedding_layers=False)
    pointer = {"path": str(Path(base_ckpt).resolve()),
               "sha256": file_sha256(_base_file(Path(base_ckpt), base_weights))}
    (ckpt_dir / BASE_POINTER).write_text(json.dumps(pointer, indent=2))


def read_base_pointer(ckpt_dir: Path, base_weights: str, force: bool = False) -> Path:
    """The base checkpoint an adapter was trained on, checked against the recorded hash."""
    try:
        pointer: dict[str, Any] = json.loads((ckpt_dir / BASE_POINTER).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{ckpt_dir} has no readable {BASE_POINTER}; it is not an adapter "
                        "checkpoint") from e
    base = Path(pointer["path"])
    weights = _base_file(base, base_weights)
    if not weights.is_file():
        raise UserError(f"the base checkpoint of adapter {ckpt_dir} is gone: {base}; restore it "
                        "or retrain the adapter")
    if file_sha256(weights) != pointer["sha256"]:
        msg = (f"the base weights at {base} changed since adapter {ckpt_dir} was trained on "
               "them; retrain the adapter, or pass force=true to use it anyway")
        if not force:
            raise UserError(msg)
        import sys

        print(f"WARNING: {msg} (force=true given)", file=sys.stderr)
    return base


def load_adapter(base_model: nn.Module, ckpt_dir: Path, trainable: bool = False) -> nn.Module:
    """Base model + the adapter saved in `ckpt_dir/adapter` (a peft `PeftModel`)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(ckpt_dir / ADAPTER_DIR),
                                     is_trainable=trainable)


def merge(model: nn.Module) -> nn.Module:
    """Fold the LoRA weights into the base: a plain model with the adapted behaviour."""
    return model.merge_and_unload()
