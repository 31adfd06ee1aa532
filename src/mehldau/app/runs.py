"""What the page may open: runs and `mehldau-compare` outputs under the configured roots.

Every name the browser sends is a path relative to one root (`root/sub/run`). It is refused
unless, with every symlink resolved, it still lies inside that root: no `..`, no absolute
paths, no link pointing out. The page can therefore read no file the user did not put under
a root, whatever a request says. (A run's own test-split pieces are the one exception: the
page offers them by id from the run's `splits.json`, and only those ids are accepted.)
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mehldau.errors import UserError
from mehldau.train.checkpoint import BRANCHES, JUDGE, read_meta, resolve_checkpoint

MAX_DEPTH = 4  # runs/production/pretrain_pijama/... : how deep under a root runs are looked for


@dataclass
class RunInfo:
    name: str  # what the page shows and sends back: "<root>/<path inside it>"
    path: Path
    branch: str | None = None
    preset: str | None = None
    stage: str | None = None
    step: int | None = None
    val_loss: float | None = None
    ckpt: Path | None = None
    reason: str | None = None  # why it cannot generate; None = usable
    styles: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.reason is None

    @property
    def label(self) -> str:
        if not self.usable:
            return f"{self.name}: unusable ({self.reason})"
        loss = f", val loss {self.val_loss:.3f}" if self.val_loss is not None else ""
        return f"{self.name}: {self.branch}, {self.preset}, {self.stage}, step {self.step}{loss}"

    def test_pieces(self) -> dict[str, Path]:
        """The run's test-split pieces that exist on disk, by id."""
        try:
            manifest = json.loads((self.path / "splits.json").read_text())
        except (OSError, ValueError):
            return {}
        pieces = manifest.get("test", {}).get("pieces", [])
        return {p["id"]: Path(p["path"]) for p in pieces
                if isinstance(p, dict) and "id" in p and Path(p.get("path", "")).is_file()}


class Roots:
    """The folders the page serves, each under the name of its last component."""

    def __init__(self, roots: list[str | Path]) -> None:
        self.roots: dict[str, Path] = {}
        for r in roots:
            path = Path(str(r)).expanduser().resolve()
            if not path.is_dir():
                raise UserError(f"app.runs: {r} is not a folder; pass app.runs=[DIR,...] with "
                                "folders holding mehldau-train runs")
            name = path.name or "root"
            while name in self.roots:
                name += "_"
            self.roots[name] = path
        if not self.roots:
            raise UserError("app.runs is empty; pass app.runs=[DIR] (e.g. app.runs=[runs])")

    def resolve(self, name: str) -> Path:
        """A name the page sent -> a path inside a root, or a one-line refusal."""
        name = str(name or "").strip()
        head, _, rest = name.partition("/")
        if not name or os.path.isabs(name) or name.startswith("~") or "\\" in name:
            raise UserError(f"refused '{name}': give a name listed by the page")
        if ".." in Path(name).parts:
            raise UserError(f"refused '{name}': '..' leaves the served folders")
        root = self.roots.get(head)
        if root is None:
            raise UserError(f"refused '{name}': not under a served folder "
                            f"({', '.join(self.roots)})")
        path = (root / rest).resolve()
        if path != root and root not in path.parents:
            raise UserError(f"refused '{name}': it links outside the served folders")
        return path

    def name_of(self, path: Path) -> str:
        path = path.resolve()
        for name, root in self.roots.items():
            if path == root or root in path.parents:
                rel = path.relative_to(root).as_posix()
                return name if rel == "." else f"{name}/{rel}"
        raise UserError(f"{path} is not under a served folder")

    def _dirs(self) -> list[Path]:
        found = []
        for root in self.roots.values():
            for here, dirs, _files in os.walk(root, followlinks=False):
                depth = len(Path(here).relative_to(root).parts)
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "checkpoints"
                                 and depth < MAX_DEPTH)
                found.append(Path(here))
        return found

    def runs(self) -> list[RunInfo]:
        """Every run under the roots (a folder with checkpoints/ or a training log), usable
        or not, each with the reason it is not."""
        out = []
        for d in self._dirs():
            if (d / "checkpoints").is_dir() or (d / "metrics.jsonl").is_file():
                out.append(describe(d, self.name_of(d)))
        return out

    def compare_outputs(self) -> list[str]:
        """Folders written by mehldau-compare (report.json beside audio/)."""
        return [self.name_of(d) for d in self._dirs()
                if (d / "report.json").is_file() and (d / "audio").is_dir()]


def _val_loss(run: Path) -> float | None:
    loss = None
    try:
        with open(run / "metrics.jsonl") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("split") == "val" and isinstance(row.get("loss"), (int, float)):
                    loss = float(row["loss"])
    except OSError:
        return None
    return loss


def describe(path: Path, name: str) -> RunInfo:
    info = RunInfo(name=name, path=path, val_loss=_val_loss(path))
    try:
        ckpt = resolve_checkpoint(path)
        meta = read_meta(ckpt)
    except UserError as e:
        info.reason = str(e).split(";")[0]
        return info
    info.ckpt, info.branch = ckpt, meta.get("branch")
    info.stage, info.step = meta.get("stage"), meta.get("step")
    info.preset = _preset(ckpt)
    if info.branch == JUDGE:
        info.reason = "a style judge: it scores music and generates none"
    elif info.branch not in BRANCHES:
        info.reason = f"unknown branch '{info.branch}'"
    elif info.stage == "autoencoder":
        info.reason = "an scg_diffusion autoencoder stage; open its diffusion run"
    else:
        try:
            importlib.import_module(f"mehldau.branches.{info.branch}.recipe")
        except ImportError as e:
            info.reason = f"branch '{info.branch}' is not in the installed mehldau ({e})"
    if info.usable:
        info.styles = _styles(ckpt)
    return info


def _preset(ckpt: Path) -> str | None:
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(ckpt / "config.yaml")
        return str(OmegaConf.select(cfg, "model.preset", default=None) or "custom")
    except Exception:  # a run without a readable config is still listed
        return None


def _styles(ckpt: Path) -> list[str]:
    try:
        tok = json.loads((ckpt / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return []
    cfg = tok.get("config", tok) if isinstance(tok, dict) else {}
    styles = cfg.get("styles") if isinstance(cfg, dict) else None
    return [str(s) for s in styles] if isinstance(styles, list) else []
