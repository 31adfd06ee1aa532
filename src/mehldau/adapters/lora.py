"""LoRA (Hu et al. 2021, arXiv 2106.09685) on the project's own modules, through peft.

Model-agnostic: `adapter.targets` are module names of the model (peft's rule: a module is
adapted when its dotted name is the target or ends in `.target`), and `adapter.ffn` /
`adapter.embeddings` add the model's own feed-forward and embedding/output modules, which a
model class names in its `adapter_groups` (Moonbeam: its compound input embedding); a class
that names none uses the Llama names (`gate_proj`/`up_proj`/`down_proj`, `embed_tokens`,
`lm_head`). A target that names anything but Linear or Embedding modules of the model is
refused in one line listing those it has: peft would otherwise fail in a traceback, or (as
a filter here once did) adapt less than asked without a word.

An adapter checkpoint holds peft's files (`adapter_config.json`, `adapter_model.safetensors`)
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
# What adapter.ffn / adapter.embeddings add on a model class without its own `adapter_groups`.
LLAMA_GROUPS = {"ffn": FFN, "embeddings": EMBEDDINGS}
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

    def target_modules(self, model: nn.Module) -> list[str]:
        """The peft targets for `model`: `targets`, each checked to name modules LoRA can
        adapt (else a one-line `UserError` listing them), then the model's `ffn` and
        `embeddings` groups when asked (the names of a group the model has)."""
        adaptable = adaptable_modules(model)
        names_of = [n for n, _ in model.named_modules() if n]
        for t in self.targets:
            # every module it names adaptable: "0" would name Moonbeam's layers.0 too
            matched = [n for n in names_of if is_target(n, [t])]
            if not matched or any(n not in adaptable for n in matched):
                raise UserError(
                    f"adapter.targets: '{t}' is not a module of {type(model).__name__} that "
                    f"LoRA can adapt; choose from {', '.join(adaptable_names(model))}")
        names = list(self.targets)
        groups = getattr(model, "adapter_groups", LLAMA_GROUPS)
        for flag in ("ffn", "embeddings"):
            if getattr(self, flag):
                # A group lists the modules of its kind a model may have: a Music Transformer
                # has gate_proj only with SwiGLU.
                names += [n for n in groups[flag] if n not in names
                          and any(is_target(name, [n]) for name in adaptable)]
        if not names:
            raise UserError(f"adapter.targets is empty; name modules of {type(model).__name__} "
                            f"to adapt, from {', '.join(adaptable_names(model))}")
        return names


def is_target(name: str, targets: list[str]) -> bool:
    """peft's rule for a list of target names: the module's dotted name is one of them or
    ends in `.` + one of them."""
    return any(name == t or name.endswith("." + t) for t in targets)


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules LoRA can adapt here, by dotted name: every Linear (bitsandbytes' 4-bit
    layers included) and Embedding."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}


def adaptable_names(model: nn.Module) -> list[str]:
    """The shortest target names that reach each adaptable module, sorted: its own name, or
    `parent.index` inside a Sequential (a bare index would also name whole layers)."""
    out = set()
    for name in adaptable_modules(model):
        parts = name.split(".")
        out.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return sorted(out)


def apply_lora(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Freeze `model` and wrap the target modules with LoRA; returns peft's `PeftModel`."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=cfg.target_modules(model), bias="none")
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
