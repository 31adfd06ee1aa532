"""Run logging: `metrics.jsonl` always; wandb (offline by default) on top, or nothing.

wandb is imported only when it is switched on, so a machine without it (or without network)
trains with `logger=none`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class MetricsFile:
    """One JSON object a line: step, split, loss, tokens/s, ... Appended and flushed per line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint we restart from."""
        if not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class NullLogger:
    def log(self, record: dict[str, Any], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    def __init__(self, run_dir: Path, config: dict[str, Any], project: str | None = None,
                 mode: str | None = None, resume: bool = False) -> None:
        # An empty WANDB_SILENT crashes wandb.init (typed bool setting); treat it as unset.
        if os.environ.get("WANDB_SILENT", None) == "":
            del os.environ["WANDB_SILENT"]
        import wandb

        self._run = wandb.init(**wandb_settings(run_dir, project, mode), config=config,
                               resume="allow" if resume else None)

    def log(self, record: dict[str, Any], step: int) -> None:
        split = record.get("split", "train")
        self._run.log({f"{split}/{k}": v for k, v in record.items() if k not in ("step", "split")},
                      step=step)

    def finish(self) -> None:
        self._run.finish()


def wandb_settings(run_dir: Path, project: str | None, mode: str | None) -> dict[str, str]:
    """wandb.init's arguments: what the config sets, else wandb's own environment variable,
    else our default (offline, in the run directory, named and identified by it). An argument
    passed to wandb.init overrides its environment variable, so none is passed blindly."""
    env = os.environ.get
    return {"project": project or env("WANDB_PROJECT") or "mehldau",
            "mode": mode or env("WANDB_MODE") or "offline",
            "dir": env("WANDB_DIR") or str(run_dir),
            "name": env("WANDB_NAME") or run_dir.name,
            "id": env("WANDB_RUN_ID") or _run_id(run_dir)}


def _run_id(run_dir: Path) -> str:
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]


def make_logger(cfg: dict[str, Any], run_dir: Path, config: dict[str, Any],
                resume: bool = False) -> NullLogger | WandbLogger:
    kind = cfg.get("name", "none")
    if kind == "none":
        return NullLogger()
    if kind == "wandb":
        return WandbLogger(run_dir, config, project=cfg.get("project"), mode=cfg.get("mode"),
                           resume=resume)
    from mehldau.errors import UserError

    raise UserError(f"unknown logger '{kind}'; use logger=wandb or logger=none")
