"""The run-setup component every branch's `train` composes: its training config, where the
run lives, what data it reads (splits included), its metrics header, what each checkpoint
carries, and the logged call of the shared trainer.

Functions, not a framework: a recipe calls them in order and keeps its own workflow in view.
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import symusic
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from mehldau.data.corpus import Corpus, build_corpus, file_hash
from mehldau.data.dataset import Augmentation
from mehldau.data.sources import Piece, pieces_from_config
from mehldau.data.splits import (
    LINEAGE,
    MANIFEST,
    ancestry,
    check_ratios,
    read_lineage,
    read_manifest,
    resume_pieces,
    splits_for_run,
    write_lineage,
)
from mehldau.errors import UserError
from mehldau.settings import checked
from mehldau.tokenize.base import Tokenizer
from mehldau.train import memory
from mehldau.train.checkpoint import checkpoint_dirs, latest_checkpoint
from mehldau.train.loggers import MetricsFile, NullLogger, make_logger
from mehldau.train.trainer import TrainConfig, fit, load_trainer_state


def train_config(cfg: DictConfig, stage: str | None = None) -> TrainConfig:
    """`cfg.train`, typed and range-checked; with `stage`, each null key is taken from
    `train.stages.<stage>` (scg_diffusion trains two stages with their own defaults)."""
    given = OmegaConf.to_container(cfg.train, resolve=True)
    per_stage = (given.pop("stages", None) or {}).get(stage, {}) if stage else {}
    merged = {k: (per_stage.get(k) if v is None else v) for k, v in given.items()}
    nullable = {f.name for f in fields(TrainConfig) if f.default is None}
    missing = [k for k, v in merged.items() if v is None and k not in nullable]
    if missing:
        raise UserError(f"train.{missing[0]} is not set for stage={stage}; give "
                        f"train.{missing[0]}=... or train.stages.{stage}.{missing[0]}=...")
    return checked(TrainConfig, merged, "train")


def check_settings(cfg: DictConfig) -> None:
    """Every shared setting typed and in range, before a recipe lists or reads any data: the
    training config (each stage's, for a branch that trains in stages), the split ratios,
    the augmentation and, when adapting, the adapter. One line names the first bad key."""
    stages = list((cfg.train.get("stages") or {}).keys())
    for stage in stages or [None]:
        train_config(cfg, stage)
    checked(_Top, {k: cfg[k] for k in ("seed", "stage", "force", "report_base_loss")
                   if k in cfg}, "")
    checked(_Split, {k: v for k, v in cfg.split.items() if k != "manifest"}, "split")
    try:
        check_ratios(OmegaConf.to_container(cfg.split.ratios, resolve=True))
    except (UserError, ValueError) as e:
        raise UserError(f"split.ratios: {e}") from e
    Augmentation.from_config(cfg.augment)
    if cfg.stage == "adapt":
        from mehldau.recipes.adapt import adapter_config

        adapter_config(cfg)


@dataclass
class _Top:
    seed: int = 0
    stage: str = "pretrain"
    force: bool = False
    report_base_loss: bool = True


@dataclass
class _Split:
    ratios: list[float] = field(default_factory=list)
    seed: int = 0


# Files a training run writes into its directory before its first checkpoint.
RUN_FILES = ("metrics.jsonl", MANIFEST, LINEAGE, "skipped.tsv")
# What a run is: a resume must agree on these with the checkpoint it continues (force=true
# overrides). train.* may change (max_steps: see `trainer.lr_factor`) except the batch,
# which fixes where in the data the run is.
IDENTITY = ("branch", "model", "data", "split.ratios", "split.seed", "stage", "init",
            "adapter", "style", "augment", "judge", "seed", "train.batch_size",
            "train.grad_accum")


def run_dir_for(cfg: DictConfig, prefix: str, resume: bool) -> Path:
    """`run_dir`, else `runs/<prefix><date-time>-<4 random hex>` (two launches in one second
    get two directories). Refused when it holds another run's checkpoints or files and this
    is no resume; on resume, its checkpoint is checked (`check_resume`). Nothing is written
    here."""
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir).expanduser()
    else:
        run_dir = Path(f"runs/{prefix}{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}")
    if not resume:
        if checkpoint_dirs(run_dir):
            raise UserError(f"{run_dir} already has checkpoints; add train.resume=true to "
                            "continue it or choose another run_dir")
        found = [n for n in RUN_FILES if (run_dir / n).exists()]
        if found:
            raise UserError(f"{run_dir} holds {found[0]} of a run that wrote no checkpoint; "
                            "choose another run_dir, or add train.resume=true to start it over")
    else:
        check_resume(cfg, run_dir)
    return run_dir


def check_resume(cfg: DictConfig, run_dir: Path) -> None:
    """Before any data is read: the latest checkpoint's trainer state loads with the safe
    unpickler, and its config agrees with this one on every `IDENTITY` key (the first that
    differs is named; `force=true` warns instead)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return
    if (ckpt / "trainer_state.pt").is_file():
        load_trainer_state(ckpt)
    if not (ckpt / "config.yaml").is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml"), resolve=False)
    now = OmegaConf.to_container(cfg, resolve=True)
    for key in IDENTITY:
        diff = _first_difference(key, _select(saved, key), _select(now, key))
        if diff is None:
            continue
        where, was, given = diff
        message = (f"train.resume: {where} is {given!r}, but {ckpt} was trained with {was!r}; "
                   f"resume with {where}={was}, or add force=true to resume anyway")
        if not cfg.get("force"):
            raise UserError(message)
        print(f"warning: {message.replace('; resume with', ' (force=true); would need')}",
              file=sys.stderr)
        return


_ABSENT = object()


def _select(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _first_difference(key: str, was: Any, now: Any) -> tuple[str, Any, Any] | None:
    """(dotted key, saved value, given value) of the first leaf that differs."""
    if isinstance(was, dict) and isinstance(now, dict):
        for k in sorted(set(was) | set(now)):
            diff = _first_difference(f"{key}.{k}", was.get(k, _ABSENT), now.get(k, _ABSENT))
            if diff is not None:
                return diff
        return None
    if was is _ABSENT or now is _ABSENT or was == now:
        return None  # a key one side lacks is a version difference, not a change
    return key, was, now


def run_pieces(cfg: DictConfig) -> list[Piece]:
    """The pieces `cfg.data` names, each with its split from the source's whole catalogue."""
    return pieces_from_config(cfg.data, cfg.cache_dir, cfg.split.ratios, cfg.split.seed)


def run_corpus(cfg: DictConfig, pieces: list[Piece], tokenizer: Tokenizer, run_dir: Path,
               base: Path | None = None, resume: bool = False, accelerator=None) -> Corpus:
    """Final splits (`split.manifest`, or those of the base and its ancestors; leaks into
    val/test from any of them refused; on resume the run's own pieces and splits,
    `resume_pieces`), then the validated, tokenized corpus; creates the run directory and
    writes skipped.tsv, splits.json and lineage.json (the base's manifest and its ancestors',
    empty without a base) into it. With several processes (`accelerator`), the main one
    builds and writes; the others then read the token cache it filled, and write nothing."""
    main = accelerator is None or accelerator.is_main_process
    own = run_dir / MANIFEST
    manifest = cfg.split.get("manifest")
    saved_rule = None
    if resume and own.is_file():
        saved = read_manifest(own)
        pieces, manifest, saved_rule = resume_pieces(pieces, saved, file_hash), own, saved["rule"]
    # A resume keeps the lineage it started with, even if an ancestor's run dir is gone since.
    lineage = (read_lineage(run_dir / LINEAGE) if resume and (run_dir / LINEAGE).is_file()
               else ancestry(base) if base is not None else [])
    pieces, rule = splits_for_run(pieces, manifest, lineage, bool(cfg.force), file_hash)
    rule = saved_rule or {**rule, **OmegaConf.to_container(cfg.split, resolve=True)}
    corpus = None
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        corpus = build_corpus(pieces, tokenizer, run_dir, cfg.cache_dir, rule)
        write_lineage(lineage, run_dir / LINEAGE)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return corpus or build_corpus(pieces, tokenizer, None, cfg.cache_dir, rule, quiet=True)


def metrics_file(run_dir: Path, resume: bool, header: dict[str, Any], main: bool = True
                 ) -> tuple[MetricsFile, bool]:
    """`metrics.jsonl`, its first line the corpus `header`. A resume from a checkpoint keeps
    the file (the trainer drops lines past the checkpoint); a run that starts from step 0
    starts a new file, so a crashed run's lines never mix with it. Only the `main` process
    writes. Returns (file, fresh)."""
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    fresh = not resume or latest_checkpoint(run_dir) is None
    if fresh and main:
        metrics.path.unlink(missing_ok=True)
        metrics.write({"step": 0, "split": "corpus", **header})
    return metrics, fresh


def checkpoint_extras(cfg: DictConfig, tokenizer: Tokenizer, model_config: dict, run_dir: Path):
    """What every checkpoint carries beside its weights, so it can be used alone: the resolved
    config, the tokenizer, the model config, the split manifest and the lineage (what the
    checkpoints it was built on trained on)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def write(d: Path) -> None:
        OmegaConf.save(OmegaConf.create(resolved), d / "config.yaml")
        tokenizer.save(d / "tokenizer.json")
        (d / "model_config.json").write_text(json.dumps(model_config, indent=2))
        for name in (MANIFEST, LINEAGE):
            (d / name).write_text((run_dir / name).read_text())

    return write


def made_up_score(notes: int) -> symusic.Score:
    """A made-up piece of `notes` notes (seeded, a note every 32nd at 120 bpm): what the
    memory plan's probe trains on, so it needs no data. Every tokenizer here gives it at
    least one token a note, and the piano roll 6.25 frames a note at 100 fps."""
    rng = np.random.default_rng(0)
    score = symusic.Score(480)
    track = symusic.Track(program=0)
    for i in range(notes):
        track.notes.append(symusic.Note(i * 60, 240, int(rng.integers(36, 96)),
                                        int(rng.integers(40, 110))))
    score.tracks.append(track)
    return score


def plan_memory(tcfg: TrainConfig, accelerator, model: torch.nn.Module,
                items: Sequence[dict[str, torch.Tensor]], adapter=None) -> TrainConfig:
    """Before any data is read: the memory plan of training `model` on micro-batches of the
    branch's own training `items` (made up, at full length; `mehldau.train.memory`),
    printed in one line, or refused in one line with the settings that would fit. Returns
    `tcfg` with `micro_batch_size=auto` resolved."""
    model.to(accelerator.device)

    def probe(rows: int) -> dict[str, torch.Tensor]:
        batch = [items[i] for i in range(rows)]
        return {k: torch.stack([b[k] for b in batch]).to(accelerator.device) for k in batch[0]}

    auto = tcfg.micro_batch_size == "auto"
    rows = tcfg.batch_size if auto or tcfg.micro_batch_size is None else min(
        tcfg.micro_batch_size, tcfg.batch_size)
    plan = memory.plan(model, probe, rows, tcfg.activation_checkpointing, adapter,
                       accelerator.device, accelerator.autocast,
                       tcfg.batch_size * tcfg.grad_accum)
    chosen = memory.check(plan, memory.budget_bytes(accelerator.device, tcfg.memory_budget_gb),
                          tcfg.batch_size, tcfg.activation_checkpointing, adapter, auto)
    return replace(tcfg, micro_batch_size=chosen) if auto else tcfg


def fit_logged(cfg: DictConfig, tcfg: TrainConfig, run_dir: Path, model: torch.nn.Module,
               train_ds: Dataset, val_ds: Dataset | None, meta: dict[str, Any], write_extra,
               accelerator, loss_unit: str, **fit_kwargs) -> dict[str, Any]:
    """The shared trainer under the run's logger (the main process's only; closed however
    the run ends); the last logged values, the final val loss also on the console."""
    logger = make_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True),
                         resume=tcfg.resume) if accelerator.is_main_process else NullLogger()
    try:
        last = fit(model, train_ds, val_ds, tcfg, run_dir, meta, write_extra, logger,
                   accelerator=accelerator, loss_unit=loss_unit, **fit_kwargs)
    finally:
        logger.finish()
    if "val_loss" in last and accelerator.is_main_process:
        print(f"final val loss {last['val_loss']:.4f} {loss_unit}", file=sys.stderr)
    return last
