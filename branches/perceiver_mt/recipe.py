"""The perceiver_mt branch: Perceiver AR (Hawthorne et al. 2022) with Music Transformer
relative attention, on the same duration tokens as production, pretrained, adapted with
LoRA or QLoRA, and sampled with cached latents.

    mehldau-train branch=perceiver_mt model=perceiver_tiny
    mehldau-train branch=perceiver_mt model=perceiver_tiny stage=adapt init=RUN adapter=qlora
    mehldau-generate ckpt=RUN out=take.mid

The workflow is below, top to bottom; the steps it shares with the other token branches are
components of `mehldau.recipes.autoregressive`, the model is `mehldau.nn.perceiver_ar`, its
crops and windows `mehldau.data.perceiver_windows`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig

from mehldau.data.perceiver_windows import PerceiverCropDataset, PerceiverWindowDataset
from mehldau.generation import StreamedNote
from mehldau.nn.perceiver_ar import PerceiverAR, PerceiverARConfig
from mehldau.recipes import autoregressive as ar
from mehldau.sampling import PerceiverDecoder
from mehldau.tokenize.base import Tokenizer

BRANCH = "perceiver_mt"


def train(cfg: DictConfig) -> Path:
    """Pretrain Perceiver AR (`stage=pretrain`), or adapt one of its runs with LoRA/QLoRA
    (`stage=adapt init=RUN`)."""
    run = ar.start_run(cfg, BRANCH, PerceiverARConfig)
    model = ar.with_base_weights(PerceiverAR(run.config), run)
    inputs, latents = run.config.max_seq_len, run.config.num_latents

    def crops(seqs: list, prefixes: list | None) -> PerceiverCropDataset:
        # up to M inputs whose last N are the targets, placed at random in the piece
        # (Flaxformer's FULL_LATENTS)
        return PerceiverCropDataset(seqs, inputs, latents, run.tokenizer, cfg.seed,
                                    run.augment, prefixes)

    ar.plan_memory(cfg, run, model, crops, inputs)
    data = ar.token_data(cfg, run)
    train_ds = crops(data.train, data.prefixes["train"])
    # validation: consecutive target windows of N, each with up to M - N tokens of context
    val_ds = PerceiverWindowDataset(data.val, inputs, latents,
                                    run.tokenizer.special_tokens["pad"],
                                    data.prefixes["val"]) if data.val else None
    return ar.fit_run(cfg, run, model, train_ds, val_ds, data)


def load_model(ckpt: Path, device: torch.device | str = "cpu", force: bool = False
               ) -> tuple[PerceiverAR, Tokenizer]:
    return ar.load_checkpoint(ckpt, PerceiverAR, PerceiverARConfig, BRANCH, device, force)


GENERATE_SETTINGS = ar.GENERATE_SETTINGS  # what mehldau-generate may set


def generate(cfg: DictConfig, ckpt: Path) -> list[Path]:
    """Continue the prompt (or start from BOS). The decoder caches the cross-attention
    inputs and the latent stack and refills both with one full forward when either is full."""
    return ar.sample_ids(*_decoding(cfg, ckpt))


def stream(cfg: DictConfig, ckpt: Path) -> Iterator[StreamedNote]:
    """What `generate` samples, as notes while they are sampled (nothing is written)."""
    return ar.stream_ids(*_decoding(cfg, ckpt))


def _decoding(cfg: DictConfig, ckpt: Path) -> tuple:
    return ar.decoding(cfg, ckpt, load_model, lambda model, prefix_len: PerceiverDecoder(
        model, bool(cfg.use_cache), prefix_len))


def score(ckpt: Path, files: list, device: torch.device | str = "cpu",
          style: str | None = None) -> list:
    """Held-out likelihood: the validation windows, whose targets are the N latents."""
    model, tokenizer = load_model(ckpt, device)
    length, latents = model.config.max_seq_len, model.config.num_latents
    pad = tokenizer.special_tokens["pad"]
    return ar.score_files(model, tokenizer, files, lambda seq, prefix: PerceiverWindowDataset(
        [seq], length, latents, pad, prefix), device, style)


def merge_checkpoint(cfg: DictConfig, ckpt: Path) -> Path:
    return ar.merge_checkpoint(cfg, ckpt, load_model)
