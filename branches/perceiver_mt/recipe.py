"""The perceiver_mt branch: Perceiver AR (Hawthorne et al. 2022) with Music Transformer
relative attention, trained, adapted (LoRA/QLoRA) and sampled by the core's autoregressive
recipe. What is specific here: the model (`mehldau.nn.perceiver_ar`), training crops of up to
M inputs whose last N positions are the targets, placed at random (Flaxformer's
FULL_LATENTS), evaluation in consecutive target windows of N with up to M - N tokens of
context, and a decoder that caches the cross-attention inputs and the latent stack and
refills them with one full forward when either is full.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from mehldau.data.perceiver_windows import PerceiverCropDataset, PerceiverWindowDataset
from mehldau.nn.perceiver_ar import PerceiverAR, PerceiverARConfig
from mehldau.recipes import autoregressive as ar
from mehldau.sampling import PerceiverDecoder

SPEC = ar.ModelSpec(
    branch="perceiver_mt",
    recipe=__name__,
    model_class=PerceiverAR,
    config_class=PerceiverARConfig,
    config_keys=("n_layers", "d_model", "n_heads", "d_ff", "max_seq_len", "num_latents",
                 "max_relative_position", "dropout", "attn_dropout", "activation", "attn_impl",
                 "prefix_dropout", "refill"),
    train_dataset=lambda seqs, mcfg, tok, seed, aug, prefixes: PerceiverCropDataset(
        seqs, mcfg.max_seq_len, mcfg.num_latents, tok, seed=seed, transpose=aug.transpose,
        stretch=(aug.stretch_min, aug.stretch_max), prefixes=prefixes),
    eval_dataset=lambda seqs, mcfg, tok, prefixes: PerceiverWindowDataset(
        seqs, mcfg.max_seq_len, mcfg.num_latents, tok.special_tokens["pad"], prefixes),
    decoder=lambda model, use_cache, prefix_len: PerceiverDecoder(model, use_cache, prefix_len),
)


def train(cfg: DictConfig) -> Path:
    return ar.train(SPEC, cfg)


def generate(cfg: DictConfig, ckpt: Path) -> list[Path]:
    return ar.generate(SPEC, cfg, ckpt)


def merge_checkpoint(cfg: DictConfig, ckpt: Path) -> Path:
    return ar.merge_checkpoint(SPEC, cfg, ckpt)


def score(ckpt: Path, files: list, device: torch.device | str = "cpu",
          style: str | None = None) -> list:
    return ar.score(SPEC, ckpt, files, device, style)  # eval windows: stride = num_latents


def load_model(ckpt: Path, device: torch.device | str = "cpu", force: bool = False
               ) -> tuple[PerceiverAR, object]:
    return ar.load_model(SPEC, ckpt, device, force)
