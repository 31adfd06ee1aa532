"""Checkpoint directories: weights as safetensors, with the resolved config and tokenizer beside.

Layout of one checkpoint (written to a temp directory, then renamed, so a crash never leaves
a half checkpoint that `latest_checkpoint` would pick up):

    <run_dir>/checkpoints/step_0000100/
        model.safetensors   weights
        meta.json           branch, step, model class
        config.yaml         the fully resolved Hydra config of the run
        tokenizer.json      the tokenizer, loadable with `load_tokenizer`
        trainer_state.pt    optimizer, scheduler, RNG states, step (only to resume)
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mehldau.errors import UserError
from mehldau.io import atomic_dir

WEIGHTS = "model.safetensors"
META = "meta.json"
BRANCHES = ("production", "perceiver_mt", "moonbeam_lora", "scg_diffusion")
# Not a branch: a model kind of the core that scores music and generates none.
JUDGE = "style_judge"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (-> its latest checkpoint) or a checkpoint directory, checked."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}; pass a run directory or a checkpoint dir")
    if (path / META).is_file() or (path / WEIGHTS).is_file():
        ckpt = path
    else:
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise UserError(
                f"no checkpoint in {path}: expected {WEIGHTS} or checkpoints/step_*; "
                "train first or pass the checkpoint directory"
            )
    if not (ckpt / META).is_file():
        raise UserError(f"checkpoint {ckpt} has no {META}; it was not written by mehldau-train")
    if read_meta(ckpt).get("stage") == "adapt":
        if not (ckpt / "adapter" / "adapter_model.safetensors").is_file():
            raise UserError(f"adapter checkpoint {ckpt} has no adapter weights; use another")
    elif not (ckpt / WEIGHTS).is_file():
        raise UserError(f"checkpoint {ckpt} has no {WEIGHTS}; it is incomplete, use another")
    return ckpt


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / META).read_text())
    except ValueError as e:
        raise UserError(f"{ckpt / META} is not valid JSON; the checkpoint is damaged") from e


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    meta: dict[str, Any],
    write_extra: Callable[[Path], None] | None = None,
    trainer_state: dict[str, Any] | None = None,
    keep_last: int = 0,
    write_weights: Callable[[torch.nn.Module, Path], None] | None = None,
) -> Path:
    """Write one checkpoint atomically; `write_weights` replaces the full-weights file (an
    adapter run saves only its adapter and a pointer to the base)."""
    final = Path(run_dir) / "checkpoints" / f"step_{step:07d}"
    with atomic_dir(final) as tmp:
        if write_weights is None:
            save_weights(model, tmp, meta)
        else:
            write_weights(model, tmp)
        (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=2))
        if write_extra is not None:
            write_extra(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer_state.pt")
    if keep_last > 0:
        import shutil

        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights(model: torch.nn.Module, ckpt_dir: Path, meta: dict[str, Any]) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(ckpt_dir / WEIGHTS), metadata={"branch": str(meta.get("branch", ""))})


def load_weights(model: torch.nn.Module, ckpt: Path, branch: str) -> None:
    """Load weights strictly; a mismatch is a user error naming the first bad key."""
    meta = read_meta(ckpt)
    if meta.get("branch") != branch:
        raise UserError(
            f"checkpoint {ckpt} is from branch '{meta.get('branch')}', not '{branch}'; "
            f"use branch={meta.get('branch')} or a {branch} checkpoint"
        )
    state = load_file(str(ckpt / WEIGHTS))
    own = model.state_dict()
    for k, v in own.items():
        if k not in state:
            raise UserError(f"checkpoint {ckpt} lacks weight '{k}'; it is not a {branch} model")
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(
                f"checkpoint weight '{k}' has shape {tuple(state[k].shape)}, the model expects "
                f"{tuple(v.shape)}; its config.yaml does not match the weights"
            )
    extra = sorted(set(state) - set(own))
    if extra:
        raise UserError(f"checkpoint {ckpt} has unexpected weight '{extra[0]}'; wrong branch?")
    model.load_state_dict(state, strict=True)


def branch_recipe(ckpt: Path, meta: dict[str, Any] | None = None):
    """The installed recipe module of the branch a checkpoint names.

    The module is always `mehldau.branches.<branch>.recipe` for one of `BRANCHES`, never a
    module name read from the checkpoint, so a downloaded run directory cannot make us import
    code of its choosing (older checkpoints named `branches.<branch>.recipe`; the branch is
    what counts)."""
    meta = read_meta(ckpt) if meta is None else meta
    branch = meta.get("branch")
    if branch == JUDGE:
        raise UserError(f"checkpoint {ckpt} is a style judge: it scores music and generates "
                        "none; use it with mehldau-compare judge.run=...")
    if branch not in BRANCHES:
        raise UserError(f"checkpoint {ckpt} names unknown branch '{branch}'; it was not written "
                        f"by mehldau (branches: {', '.join(BRANCHES)})")
    return importlib.import_module(f"mehldau.branches.{branch}.recipe")
