"""The production branch: a Music Transformer (Huang et al. 2018) on duration tokens,
pretrained, then adapted with LoRA or QLoRA, then sampled with a KV cache.

    mehldau-train                                  # pretrain (the demo: tiny model, demo MIDI)
    mehldau-train stage=adapt init=RUN adapter=lora
    mehldau-generate ckpt=RUN out=take.mid

The workflow is below, top to bottom; the steps it shares with the other token branches are
components of `mehldau.recipes.autoregressive` (run setup, corpus, fitting, sampling), the
model is `mehldau.nn.music_transformer`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig

from mehldau.data.dataset import RandomCropDataset, WindowDataset
from mehldau.generation import StreamedNote
from mehldau.nn.music_transformer import MusicTransformer, MusicTransformerConfig
from mehldau.recipes import autoregressive as ar
from mehldau.sampling import KVCacheDecoder
from mehldau.tokenize.base import Tokenizer

BRANCH = "production"


def train(cfg: DictConfig) -> Path:
    """Pretrain a Music Transformer (`stage=pretrain`), or fit a LoRA/QLoRA adapter to one of
    its runs (`stage=adapt init=RUN`)."""
    run = ar.start_run(cfg, BRANCH, MusicTransformerConfig)
    model = ar.with_base_weights(MusicTransformer(run.config), run)
    length = run.config.max_seq_len

    def crops(seqs: list, prefixes: list | None) -> RandomCropDataset:
        # random crops of one context, transposed and time-stretched
        return RandomCropDataset(seqs, length, run.tokenizer, cfg.seed, run.augment, prefixes)

    ar.plan_memory(cfg, run, model, crops, length)
    data = ar.token_data(cfg, run)
    train_ds = crops(data.train, data.prefixes["train"])
    # validation: every piece once, in consecutive windows
    val_ds = WindowDataset(data.val, length, run.tokenizer.special_tokens["pad"],
                           data.prefixes["val"]) if data.val else None
    return ar.fit_run(cfg, run, model, train_ds, val_ds, data)


def load_model(ckpt: Path, device: torch.device | str = "cpu", force: bool = False
               ) -> tuple[MusicTransformer, Tokenizer]:
    return ar.load_checkpoint(ckpt, MusicTransformer, MusicTransformerConfig, BRANCH, device,
                              force)


GENERATE_SETTINGS = ar.GENERATE_SETTINGS  # what mehldau-generate may set


def generate(cfg: DictConfig, ckpt: Path) -> list[Path]:
    """Continue the prompt (or start from BOS); past the context the decoder slides by
    re-prefilling the last 7/8 of a window into the KV cache."""
    return ar.sample_ids(*_decoding(cfg, ckpt))


def stream(cfg: DictConfig, ckpt: Path) -> Iterator[StreamedNote]:
    """What `generate` samples, as notes while they are sampled (nothing is written)."""
    return ar.stream_ids(*_decoding(cfg, ckpt))


def _decoding(cfg: DictConfig, ckpt: Path) -> tuple:
    return ar.decoding(cfg, ckpt, load_model, lambda model, prefix_len: KVCacheDecoder(
        model, model.config.max_seq_len, bool(cfg.use_cache), prefix_len))


def score(ckpt: Path, files: list, device: torch.device | str = "cpu",
          style: str | None = None) -> list:
    """Held-out likelihood: windows of the full context, each scoring its last half."""
    model, tokenizer = load_model(ckpt, device)
    length, pad = model.config.max_seq_len, tokenizer.special_tokens["pad"]
    return ar.score_files(model, tokenizer, files, lambda seq, prefix: WindowDataset(
        [seq], length, pad, prefix, stride=length // 2), device, style)


def merge_checkpoint(cfg: DictConfig, ckpt: Path) -> Path:
    return ar.merge_checkpoint(cfg, ckpt, load_model)
