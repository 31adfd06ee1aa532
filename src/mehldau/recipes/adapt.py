"""The adaptation component: what `stage=adapt` adds to a token branch's training run.

A recipe that adapts calls these in order: `base_checkpoint` (the run to adapt, checked),
`base_tokenizer` (adapting keeps the base's vocabulary), `check_styles`, then, once the
model holds the base's weights, `frozen_base` (4-bit for QLoRA), `report_base_loss` and
`with_adapter` (LoRA on top; the trainer then saves adapters instead of whole models).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mehldau.adapters import (
    AdapterConfig,
    apply_lora,
    qlora,
    save_adapter,
    trainable_parameters,
)
from mehldau.data.sources import Piece
from mehldau.errors import UserError
from mehldau.settings import checked
from mehldau.tokenize.base import Tokenizer, build_tokenizer, load_tokenizer
from mehldau.train import memory
from mehldau.train.checkpoint import WEIGHTS, read_meta, resolve_checkpoint
from mehldau.train.loggers import MetricsFile
from mehldau.train.trainer import TrainConfig, evaluate


def adapter_config(cfg: DictConfig) -> AdapterConfig:
    """`adapter` (lora|qlora) over the branch's defaults: a null there (alpha, targets) takes
    `branch.adapter`, so `adapter=qlora` adapts each model where its paper does."""
    given = OmegaConf.to_container(cfg.adapter, resolve=True)
    defaults = OmegaConf.to_container(cfg.branch.get("adapter") or {}, resolve=True)
    return checked(AdapterConfig,
                   {**defaults, **{k: v for k, v in given.items() if v is not None}}, "adapter")


def base_checkpoint(cfg: DictConfig, branch: str) -> Path:
    """`init`: a checkpoint of this branch that is not itself an adapter."""
    if cfg.init is None:
        raise UserError(f"stage=adapt needs init=<a {branch} run or checkpoint directory>")
    base = resolve_checkpoint(cfg.init)
    meta = read_meta(base)
    if meta.get("branch") != branch:
        raise UserError(f"init {base} is a '{meta.get('branch')}' checkpoint; the {branch} "
                        f"branch adapts {branch} checkpoints")
    if meta.get("stage") == "adapt":
        raise UserError(f"init {base} is itself an adapter; merge it first (mehldau-merge "
                        "ckpt=... out=DIR) and adapt the merged checkpoint")
    return base


def base_tokenizer(base: Path, name: str, config: dict) -> Tokenizer:
    """The base's tokenizer, refused when the branch's (`name`, `config`) asks for another:
    an adapter cannot change the vocabulary its base was trained on."""
    tokenizer = load_tokenizer(base / "tokenizer.json")
    wanted = build_tokenizer(name, {**config, **({"styles": tokenizer.styles}
                                                 if tokenizer.styles else {})})
    if wanted.name != tokenizer.name:
        raise UserError(f"init {base} was trained with the '{tokenizer.name}' tokenizer, the "
                        f"branch's is '{wanted.name}'; adapting keeps the base's: add "
                        f"branch.tokenizer.name={tokenizer.name}")
    if wanted != tokenizer:
        raise UserError(f"branch.tokenizer differs from the tokenizer of init {base}; adapting "
                        "uses the base's tokenizer, so drop the branch.tokenizer override")
    return tokenizer


def style_of(piece: Piece, cfg: DictConfig) -> str:
    """The style token a piece trains under: `style.name` for all, else the piece's own."""
    return cfg.style.name if cfg.style.get("name") else piece.style


def checked_style_id(tokenizer: Tokenizer, name: str) -> int:
    try:
        return tokenizer.style_id(name)
    except UserError as e:
        raise UserError(f"{e}; the base does not know the data's style: set style.name to "
                        "one of them") from e


def check_styles(tokenizer: Tokenizer, pieces: list[Piece], cfg: DictConfig,
                 base: Path) -> None:
    """A style-conditioned base needs a style it knows for every piece; a plain one, none."""
    if tokenizer.styles:
        for name in {style_of(p, cfg) for p in pieces}:
            checked_style_id(tokenizer, name)
    elif cfg.style.enabled:
        raise UserError(f"init {base} was trained without style conditioning; drop "
                        "style.enabled")


def report_base_loss(model: torch.nn.Module, val_ds, accelerator, tcfg: TrainConfig,
                     metrics: MetricsFile, unit: str) -> None:
    """The base's val loss before adapting, as metrics.jsonl's step-0 line (`model: base`):
    what the adapter's val losses are read against."""
    loss = evaluate(model.to(accelerator.device), val_ds, accelerator, tcfg.eval_batch_size,
                    tcfg.eval_max_batches, micro_batch_size=tcfg.micro_batch_size)
    if accelerator.is_main_process:
        metrics.write({"step": 0, "split": "val", "loss": round(loss, 5), "model": "base"})
        print(f"base val loss before adapting: {loss:.4f} {unit}", file=sys.stderr)


def frozen_base(model: torch.nn.Module, acfg: AdapterConfig,
                device: torch.device) -> torch.nn.Module:
    """The base as the adapter will see it: in 4-bit NF4 for QLoRA (so the base loss reported
    before adapting is that of the model being adapted), unchanged for LoRA."""
    if acfg.kind == "qlora":
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        qlora.quantize_4bit(model, compute, device)
        memory.give_back()  # the fp32 weights just replaced
    return model


def with_adapter(model: torch.nn.Module, acfg: AdapterConfig, base: Path,
                 device: torch.device) -> tuple[torch.nn.Module, dict]:
    """LoRA on the (frozen, `frozen_base`) model. Returns the model and the trainer's keyword
    arguments that make its checkpoints hold the adapter and a pointer to `base`."""
    model = apply_lora(model, acfg)
    trainable, total = trainable_parameters(model)
    print(f"adapter {acfg.kind}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f} %)", file=sys.stderr)

    def write_weights(m: torch.nn.Module, d: Path) -> None:
        save_adapter(m, d, base, WEIGHTS)

    def read_weights(m: torch.nn.Module, d: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(m, load_file(str(d / "adapter" / "adapter_model.safetensors")))

    hooks: dict = {"write_weights": write_weights, "read_weights": read_weights}
    if acfg.kind == "qlora":
        hooks["make_optimizer"] = lambda m, c: qlora.make_optimizer(
            [p for p in m.parameters() if p.requires_grad], c.lr, c.weight_decay,
            (c.beta1, c.beta2), device)
    return model, hooks
