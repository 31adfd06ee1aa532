"""The production branch: a Music Transformer trained, adapted and sampled by the core's
autoregressive recipe (`mehldau.recipes.autoregressive`). What is specific to this branch:
its model (`mehldau.nn.music_transformer`), plain random crops of `max_seq_len` tokens for
training, non-overlapping windows for evaluation, strided windows for held-out likelihood,
and a KV-cache decoder that re-prefills 7/8 of a window when it passes the context.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from mehldau.data.dataset import RandomCropDataset, WindowDataset
from mehldau.nn.music_transformer import MusicTransformer, MusicTransformerConfig
from mehldau.recipes import autoregressive as ar
from mehldau.sampling import KVCacheDecoder

SPEC = ar.ModelSpec(
    branch="production",
    recipe=__name__,
    model_class=MusicTransformer,
    config_class=MusicTransformerConfig,
    config_keys=("n_layers", "d_model", "n_heads", "d_ff", "max_seq_len",
                 "max_relative_position", "dropout", "attn_dropout", "activation", "attn_impl"),
    train_dataset=lambda seqs, mcfg, tok, seed, aug, prefixes: RandomCropDataset(
        seqs, mcfg.max_seq_len, tok, seed=seed, transpose=aug.transpose,
        stretch=(aug.stretch_min, aug.stretch_max), prefixes=prefixes),
    eval_dataset=lambda seqs, mcfg, tok, prefixes: WindowDataset(
        seqs, mcfg.max_seq_len, tok.special_tokens["pad"], prefixes),
    decoder=lambda model, use_cache, prefix_len: KVCacheDecoder(
        model, model.config.max_seq_len, use_cache, prefix_len),
    score_dataset=lambda seqs, mcfg, tok, prefixes: WindowDataset(
        seqs, mcfg.max_seq_len, tok.special_tokens["pad"], prefixes,
        stride=mcfg.max_seq_len // 2),
)


def train(cfg: DictConfig) -> Path:
    return ar.train(SPEC, cfg)


def generate(cfg: DictConfig, ckpt: Path) -> list[Path]:
    return ar.generate(SPEC, cfg, ckpt)


def merge_checkpoint(cfg: DictConfig, ckpt: Path) -> Path:
    return ar.merge_checkpoint(SPEC, cfg, ckpt)


def score(ckpt: Path, files: list, device: torch.device | str = "cpu",
          style: str | None = None) -> list:
    return ar.score(SPEC, ckpt, files, device, style)


def load_model(ckpt: Path, device: torch.device | str = "cpu", force: bool = False
               ) -> tuple[MusicTransformer, object]:
    return ar.load_model(SPEC, ckpt, device, force)
