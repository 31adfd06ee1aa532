"""The run-setup component every branch's `train` composes: its training config, where the
run lives, what data it reads (splits included), its metrics header, what each checkpoint
carries, and the logged call of the shared trainer.

Functions, not a framework: a recipe calls them in order and keeps its own workflow in view.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from mehldau.data.corpus import Corpus, build_corpus, file_hash
from mehldau.data.sources import Piece, pieces_from_config
from mehldau.data.splits import MANIFEST, splits_for_run
from mehldau.errors import UserError
from mehldau.tokenize.base import Tokenizer
from mehldau.train.checkpoint import checkpoint_dirs
from mehldau.train.loggers import MetricsFile, make_logger
from mehldau.train.trainer import TrainConfig, fit


def train_config(cfg: DictConfig) -> TrainConfig:
    try:
        return TrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))
    except TypeError as e:
        raise UserError(f"bad train config: {e}; see configs/train/default.yaml") from e


def run_dir_for(cfg: DictConfig, prefix: str, resume: bool) -> Path:
    """`run_dir`, else `runs/<prefix><date-time>`; refused when it already holds checkpoints
    and this is no resume (nothing is written here)."""
    run_dir = Path(cfg.run_dir or f"runs/{prefix}{datetime.now():%Y%m%d-%H%M%S}").expanduser()
    if checkpoint_dirs(run_dir) and not resume:
        raise UserError(f"{run_dir} already has checkpoints; add train.resume=true to continue "
                        "it or choose another run_dir")
    return run_dir


def run_pieces(cfg: DictConfig) -> list[Piece]:
    """The pieces `cfg.data` names, each with its split from the source's whole catalogue."""
    return pieces_from_config(cfg.data, cfg.cache_dir, cfg.split.ratios, cfg.split.seed)


def run_corpus(cfg: DictConfig, pieces: list[Piece], tokenizer: Tokenizer, run_dir: Path,
               base: Path | None = None) -> Corpus:
    """Final splits (`split.manifest`, or the base's; leaks into val/test refused), then the
    validated, tokenized corpus; creates the run directory and writes skipped.tsv and
    splits.json into it."""
    pieces, rule = splits_for_run(pieces, cfg.split.get("manifest"), base, bool(cfg.force),
                                  file_hash)
    run_dir.mkdir(parents=True, exist_ok=True)
    return build_corpus(pieces, tokenizer, run_dir, cfg.cache_dir,
                        {**rule, **OmegaConf.to_container(cfg.split, resolve=True)})


def metrics_file(run_dir: Path, resume: bool, header: dict[str, Any]) -> tuple[MetricsFile, bool]:
    """`metrics.jsonl`, its first line the corpus `header` unless a resumed run wrote it
    already. Returns (file, fresh)."""
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    fresh = not resume or not metrics.path.exists()
    if fresh:
        metrics.write({"step": 0, "split": "corpus", **header})
    return metrics, fresh


def checkpoint_extras(cfg: DictConfig, tokenizer: Tokenizer, model_config: dict, run_dir: Path):
    """What every checkpoint carries beside its weights, so it can be used alone: the resolved
    config, the tokenizer, the model config and the split manifest."""
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def write(d: Path) -> None:
        OmegaConf.save(OmegaConf.create(resolved), d / "config.yaml")
        tokenizer.save(d / "tokenizer.json")
        (d / "model_config.json").write_text(json.dumps(model_config, indent=2))
        (d / MANIFEST).write_text((run_dir / MANIFEST).read_text())

    return write


def fit_logged(cfg: DictConfig, tcfg: TrainConfig, run_dir: Path, model: torch.nn.Module,
               train_ds: Dataset, val_ds: Dataset | None, meta: dict[str, Any], write_extra,
               accelerator, loss_unit: str, **fit_kwargs) -> dict[str, Any]:
    """The shared trainer under the run's logger (closed however the run ends); the last
    logged values, the final val loss also on the console."""
    logger = make_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True),
                         resume=tcfg.resume)
    try:
        last = fit(model, train_ds, val_ds, tcfg, run_dir, meta, write_extra, logger,
                   accelerator=accelerator, loss_unit=loss_unit, **fit_kwargs)
    finally:
        logger.finish()
    if "val_loss" in last:
        print(f"final val loss {last['val_loss']:.4f} {loss_unit}", file=sys.stderr)
    return last
