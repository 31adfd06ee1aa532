"""Style in numbers: the style judge (`mehldau.recipes.style_judge`) loaded, run over clips,
and the figures that describe it (its own test report) or that it gives a comparison (whose
music it thinks a branch plays).

Judge report, on its test split: accuracy per clip and per piece (a piece's clip
probabilities averaged), top-1 and top-5, the target pianist against the rest as ROC-AUC per
clip and per piece, a confusion matrix of the most confused classes, each with a bootstrap
interval over pieces (clips of one piece are not independent).

Comparison (`style_table`): per system, the share of its clips attributed to the target and
the mean target probability, with intervals over prompts; a sliding-window agreement over
each clip; and two distances in the judge's penultimate layer to the target's held-out
clips, a Fréchet distance (Heusel et al. 2017's formula on these embeddings) and a kernel
distance (Bińkowski et al. 2018's unbiased MMD² with a cubic polynomial kernel). They are
named for what they are: not FMD, which names a distance in another model's space.

ROC-AUC, Fréchet distance and KID are a few lines each on numpy/scipy; scikit-learn and
torchmetrics are not dependencies of this project for three formulas.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

from mehldau.data.clips import clip_starts, render_clip
from mehldau.errors import UserError
from mehldau.evaluation.distribution import bootstrap_many
from mehldau.io import atomic_file
from mehldau.nn.performer_classifier import PerformerClassifier, PerformerClassifierConfig
from mehldau.train.checkpoint import load_weights, read_meta, resolve_checkpoint

REPORT = "judge_report.json"


@dataclass
class Judge:
    model: PerformerClassifier
    classes: list[str]
    seconds: float  # the clip length it was trained on
    fps: int
    ckpt: Path
    info: dict  # its classes.json
    report: dict | None  # its judge_report.json, when written

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            more = ", ..." if len(self.classes) > 12 else ""
            raise UserError(f"judge.target '{name}' is not one of the judge's classes "
                            f"({', '.join(self.classes[:12])}{more}); pass one of them")
        return self.classes.index(name)

    @torch.no_grad()
    def score(self, clips: Sequence[tuple[np.ndarray, float, float]], batch: int = 32
              ) -> tuple[np.ndarray, np.ndarray]:
        """(notes (N, 4), start, seconds) clips -> (probabilities (n, K), embeddings (n, C))."""
        probs, embs = [], []
        for i in range(0, len(clips), batch):
            part = clips[i:i + batch]
            lengths = {round(s * self.fps) for _, _, s in part}
            groups = [part] if len(lengths) == 1 else [[c] for c in part]
            for g in groups:
                x = torch.from_numpy(np.stack([render_clip(n, a, s, self.fps)
                                               for n, a, s in g]))[:, None].to(self.device)
                out = self.model(x)
                probs.append(torch.softmax(out.logits.float(), -1).cpu().numpy())
                embs.append(out.embedding.float().cpu().numpy())
        k, c = len(self.classes), self.model.head.in_features
        return (np.concatenate(probs) if probs else np.zeros((0, k)),
                np.concatenate(embs) if embs else np.zeros((0, c)))


def load_judge(path: str | Path, device: torch.device | str = "cpu") -> Judge:
    """A judge run directory or checkpoint -> `Judge` (eval mode, on `device`)."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if meta.get("branch") != "style_judge":
        raise UserError(f"judge.run {path} is a '{meta.get('branch')}' run, not a style judge; "
                        "train one with mehldau-train branch=style_judge")
    try:
        info = json.loads((ckpt / "classes.json").read_text())
        cfg = PerformerClassifierConfig(**json.loads((ckpt / "model_config.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"judge checkpoint {ckpt} is damaged ({e}); retrain it or pass another "
                        "judge.run") from e
    model = PerformerClassifier(cfg)
    load_weights(model, ckpt, "style_judge")
    report = None
    for d in (ckpt, ckpt.parent):
        if (d / REPORT).is_file():
            report = json.loads((d / REPORT).read_text())
            break
    return Judge(model.to(device).eval(), list(info["classes"]), float(info["seconds"]),
                 int(info["fps"]), ckpt, info, report)


# --- the judge's own report ------------------------------------------------------------------
def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney U statistic, ties counted half); NaN when
    one side is empty."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _topk(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == labels[:, None]).any(1).mean()) if len(labels) else math.nan


def judge_report(judge: Judge, notes: Sequence[np.ndarray], labels: Sequence[int],
                 ids: Sequence[str], target: str | None, n_boot: int = 200, seed: int = 0,
                 eval_batch: int = 32) -> dict:
    """The judge on held-out pieces (`notes`, their class `labels`): see the module doc."""
    clips, owner = [], []
    for k, n in enumerate(notes):
        if len(n) == 0:
            continue
        for s in clip_starts(n, judge.seconds):
            clips.append((n, s, judge.seconds))
            owner.append(k)
    probs, _ = judge.score(clips, eval_batch)
    owner_a = np.array(owner, np.int64)
    labels_a = np.asarray(labels, np.int64)
    t = judge.classes.index(target) if target is not None else None
    pieces = sorted(set(owner))
    groups = [[(probs[owner_a == k], int(labels_a[k]))] for k in pieces]

    def stat(rows: list, _unused: list) -> list[float]:
        clip_p = np.concatenate([p for p, _ in rows])
        clip_y = np.concatenate([np.full(len(p), y) for p, y in rows])
        piece_p = np.stack([p.mean(0) for p, _ in rows])
        piece_y = np.array([y for _, y in rows])
        out = [float((clip_p.argmax(1) == clip_y).mean()),
               float((piece_p.argmax(1) == piece_y).mean()),
               _topk(clip_p, clip_y, 5), _topk(piece_p, piece_y, 5)]
        if t is not None:
            out += [roc_auc(clip_p[:, t], clip_y == t), roc_auc(piece_p[:, t], piece_y == t)]
        return out

    if not groups:
        raise UserError("the judge's test split has no piece of a class it knows; use more "
                        "files or other split.ratios")
    values = bootstrap_many(groups, [[0]], stat, n_boot, seed)
    names = ["clip_accuracy", "piece_accuracy", "clip_top5", "piece_top5"]
    names += ["clip_auc", "piece_auc"] if t is not None else []
    report: dict = dict(zip(names, values))
    piece_p = np.stack([probs[owner_a == k].mean(0) for k in pieces])
    piece_y = labels_a[pieces]
    K = len(judge.classes)
    confusion = np.zeros((K, K), np.int64)
    np.add.at(confusion, (piece_y, piece_p.argmax(1)), 1)
    report.update(
        classes=judge.classes, target=target, chance=1 / K, clips=len(clips),
        pieces=len(pieces), clip_seconds=judge.seconds, fps=judge.fps,
        confusion=confusion.tolist(), bootstrap=n_boot,
        per_class={c: {"pieces": int((piece_y == i).sum()),
                       "recall": float((piece_p.argmax(1)[piece_y == i] == i).mean())
                       if (piece_y == i).any() else None} for i, c in enumerate(judge.classes)},
        piece_predictions=[{"id": ids[k], "class": judge.classes[int(labels_a[k])],
                            "predicted": judge.classes[int(p.argmax())],
                            "probability": round(float(p.max()), 4)}
                           for k, p in zip(pieces, piece_p)],
        shuffled_labels=bool(judge.info.get("shuffled_labels", False)))
    return report


def confused_classes(confusion: np.ndarray, target: int | None, most: int = 12) -> list[int]:
    """The classes in the most off-diagonal confusion (either way), the target always in."""
    c = np.asarray(confusion, float)
    off = c - np.diag(np.diag(c))
    weight = off.sum(0) + off.sum(1)
    order = [int(i) for i in np.argsort(-weight, kind="stable")]
    chosen = ([target] if target is not None else []) + [i for i in order if i != target]
    return sorted(chosen[:most])


def write_judge_report(report: dict, out: Path) -> None:
    """judge_report.json, judge_report.md and confusion.png into `out` (each atomically)."""
    with atomic_file(out / REPORT) as f:
        json.dump(report, f, indent=1)
    t = report["classes"].index(report["target"]) if report.get("target") else None
    keep = confused_classes(np.array(report["confusion"]), t)
    _confusion_png(np.array(report["confusion"])[np.ix_(keep, keep)],
                   [report["classes"][i] for i in keep], out / "confusion.png")

    def ci(key: str) -> str:
        v, lo, hi = report[key]
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"

    lines = [
        f"# Style judge report: {report.get('run', '')}", "",
        f"Test split: {report['pieces']} pieces, {report['clips']} clips of "
        f"{report['clip_seconds']:g} s at {report['fps']} frames/s; {len(report['classes'])} "
        f"classes (chance {report['chance']:.3f}); 95 % bootstrap intervals over pieces "
        f"({report['bootstrap']} resamples)."
        + (" **Trained on shuffled labels (a control).**" if report["shuffled_labels"] else ""),
        "", "| figure | per clip | per piece |", "|---|---|---|",
        f"| accuracy (top-1) | {ci('clip_accuracy')} | {ci('piece_accuracy')} |",
        f"| top-5 | {ci('clip_top5')} | {ci('piece_top5')} |"]
    if t is not None:
        lines.append(f"| ROC-AUC, {report['target']} vs rest | {ci('clip_auc')} | "
                     f"{ci('piece_auc')} |")
    lines += ["", "| class | test pieces | recall (per piece) |", "|---|---|---|"]
    for c, v in report["per_class"].items():
        r = "–" if v["recall"] is None else f"{v['recall']:.2f}"
        lines.append(f"| {c} | {v['pieces']} | {r} |")
    lines += ["", "![confusion matrix of the most confused classes](confusion.png)", ""]
    with atomic_file(out / "judge_report.md") as f:
        f.write("\n".join(lines))


def _confusion_png(confusion: np.ndarray, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = confusion.sum(1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    size = 2.5 + 0.45 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("attributed to")
    ax.set_ylabel("played by")
    for i in range(len(names)):
        for j in range(len(names)):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="share of the row's test pieces")
    ax.set_title("Style judge: test pieces (most confused classes)")
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


# --- distances in the judge's space ----------------------------------------------------------
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^½) of two embedding sets (rows)."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^½) is the sum of the square roots of S_a S_b's eigenvalues, which are real
    # and >= 0 for two covariances: no matrix square root (singular with few clips) needed.
    eig = np.linalg.eigvals(sa @ sb)
    root = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(max(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * root, 0.0))


def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² with k(x, y) = (x·y / d + 1)³ (KID's kernel)."""
    m, n = len(a), len(b)
    if m < 2 or n < 2:
        return math.nan
    d = a.shape[1]

    def k(x, y):
        return (x @ y.T / d + 1) ** 3

    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float((kaa.sum() - np.trace(kaa)) / (m * (m - 1))
                 + (kbb.sum() - np.trace(kbb)) / (n * (n - 1)) - 2 * kab.mean())


def warn(message: str) -> None:
    print(f"compare: {message}", file=sys.stderr)


# --- style in mehldau-compare ----------------------------------------------------------------
def notes_array(notes) -> np.ndarray:
    """`features.Notes` -> the judge's `(N, 4)` rows (onset, end, pitch, velocity)."""
    return np.stack([notes.onset, notes.end, notes.pitch, notes.velocity], 1).astype(
        np.float32).reshape(-1, 4)


def _file_notes(path: Path) -> np.ndarray | None:
    from mehldau.data.corpus import BadMidi, read_score
    from mehldau.tokenize.note_list import NoteListTokenizer

    try:
        return NoteListTokenizer().encode(read_score(path))
    except BadMidi as e:
        warn(f"style: skipped {path}: {e}")
        return None


def held_out_pieces(judge: Judge, split: str, target: str, same: bool) -> list[tuple[str, Path]]:
    """(id, path) of the judge's `split` pieces of the target class (`same`) or of every other
    class, sorted by id."""
    from mehldau.data.splits import find_manifest, read_manifest

    manifest = read_manifest(find_manifest(judge.ckpt))
    classes = judge.info["pieces"].get(split, {})
    out = []
    for e in manifest[split]["pieces"]:
        c = classes.get(e["id"])
        if c is not None and (c == target) == same:
            out.append((e["id"], Path(e["path"])))
    return sorted(out)


def clips_of(pieces: Sequence[tuple[str, Path]], seconds: float, count: int | None, seed: int
             ) -> list[tuple[str, str, np.ndarray]]:
    """(piece id, source path, notes from the clip's start) of consecutive `seconds` clips
    over each piece; with `count`, that many, dealt round-robin over pieces in a seeded order
    so every piece gives clips before any gives two."""
    per_piece = []
    for pid, path in pieces:
        notes = _file_notes(path) if path.is_file() else None
        if notes is None or not len(notes):
            if not path.is_file():
                warn(f"style: held-out piece {path} is missing; left out")
            continue
        clips = []
        for s in clip_starts(notes, seconds):
            c = notes[(notes[:, 1] > s) & (notes[:, 0] < s + seconds)].copy()
            c[:, :2] -= s
            clips.append((pid, str(path), c))
        per_piece.append(clips)
    order = np.random.default_rng(seed).permutation(len(per_piece))
    out, depth = [], 0
    while per_piece and (count is None or len(out) < count):
        row = [per_piece[i][depth] for i in order if depth < len(per_piece[i])]
        if not row:
            break
        out += row
        depth += 1
    return out if count is None else out[:count]


def check_overlaps(judge: Judge, runs, ref: Sequence[tuple[str, Path]],
                   held_out: Sequence[str], force: bool) -> dict:
    """The guard rails, by content hash: no reference piece (the prompts and the human
    ceiling) in the judge's training split, and no held-out piece the judge's floor or
    distance reference uses in any compared run's (or its ancestors') training split."""
    from mehldau.data.corpus import file_hash
    from mehldau.data.splits import find_manifest, lineage_manifests, read_manifest

    judge_manifest = read_manifest(find_manifest(judge.ckpt))
    judge_train = {e["sha"] for e in judge_manifest["train"]["pieces"] if "sha" in e}
    runs_train = {e["sha"] for run in runs for _, m in lineage_manifests(run.ckpt) if m
                  for e in m["train"].get("pieces", []) if "sha" in e}

    def sha(path) -> str | None:
        return file_hash(Path(path)) if Path(path).is_file() else None

    in_judge = [str(p) for _, p in ref if sha(p) in judge_train]
    in_runs = [p for p in held_out if sha(p) in runs_train]
    problems = []
    if in_judge:
        problems.append(
            f"{len(in_judge)} of the {len(ref)} reference pieces (the prompts and the human "
            f"ceiling) are in the judge's training split (by content hash, e.g. {in_judge[0]}); "
            "train the judge on the runs' splits (split.manifest=RUN/splits.json)")
    if in_runs:
        problems.append(
            f"{len(in_runs)} of the judge's {len(held_out)} held-out pieces used as the style "
            f"floor and distance reference are in a compared run's training split (by content "
            f"hash, e.g. {in_runs[0]}); train the judge on the runs' splits")
    for message in problems:
        if not force:
            raise UserError(f"{message}, or add force=true")
        warn(f"warning (force=true): {message}")
    return {"reference_in_judge_training": len(in_judge),
            "judge_held_out_in_run_training": len(in_runs), "forced": bool(problems)}


def _group_mean(values: np.ndarray, groups: Sequence[str], n_boot: int, seed: int) -> tuple:
    from mehldau.evaluation import distribution as dist

    by: dict[str, list[float]] = {}
    for v, g in zip(values, groups):
        by.setdefault(g, []).append(float(v))
    if not by:
        return (math.nan, math.nan, math.nan)
    return dist.bootstrap(list(by.values()), [[0.0]], lambda x, _: float(np.mean(x)),
                          n=n_boot, seed=seed)


def style_row(judge: Judge, t: int, clips: Sequence[np.ndarray], groups: Sequence[str],
              seconds: float, window: float, hop: float, reference: np.ndarray | None,
              n_boot: int, seed: int) -> dict:
    """One system's style figures (see the module doc); `clips` start at 0 and last
    `seconds`, `groups` are the bootstrap units (prompts; a floor's pieces)."""
    probs, emb = judge.score([(c, 0.0, seconds) for c in clips])
    hit = probs.argmax(1) == t if len(probs) else np.zeros(0, bool)
    starts = np.arange(0.0, max(seconds - window, 0.0) + 1e-9, hop)
    w_probs, _ = judge.score([(c, float(s), window) for c in clips for s in starts])
    w_hit = (w_probs.argmax(1) == t).reshape(len(clips), len(starts)).mean(1) \
        if len(clips) else np.zeros(0)
    top = np.bincount(probs.argmax(1), minlength=len(judge.classes)) if len(probs) else []
    row = {"clips": len(clips),
           "target_share": _group_mean(hit.astype(float), groups, n_boot, seed),
           "target_probability": _group_mean(probs[:, t] if len(probs) else np.zeros(0),
                                             groups, n_boot, seed),
           "window_share": _group_mean(w_hit, groups, n_boot, seed),
           "attributed_to": {judge.classes[i]: int(top[i])
                             for i in np.argsort(-np.asarray(top))[:3] if top[i]}}
    if reference is not None:
        row["frechet"] = frechet_distance(emb, reference)
        row["kernel"] = kernel_distance(emb, reference)
    return row


@dataclass
class StylePlan:
    """What `open_judge` settled before anything is generated."""

    judge: Judge
    target: str
    window: float
    hop: float
    others: list[tuple[str, Path]]  # the other classes' test pieces: the second floor
    distance_ref: list[tuple[str, Path]]  # the target's val pieces: Fréchet / kernel distance
    guard: dict


def open_judge(cfg, runs, ref: Sequence[tuple[str, Path]]) -> StylePlan:
    """The judge `cfg.judge.run` names, its target, window settings and the guard rails
    checked (`check_overlaps`): all before anything is generated."""
    from mehldau.generation import device_for

    judge = load_judge(str(cfg.judge.run), device_for(str(cfg.device)))
    target = str(cfg.judge.target)
    judge.class_index(target)
    seconds, j = float(cfg.seconds), cfg.judge
    window = float(j.window_seconds) if j.get("window_seconds") else seconds / 2
    hop = float(j.hop_seconds) if j.get("hop_seconds") else window / 2
    if not (0 < window <= seconds and hop > 0):
        raise UserError(f"judge.window_seconds must be in (0, seconds={seconds:g}] and "
                        f"judge.hop_seconds > 0, got {window:g} and {hop:g}")
    others = held_out_pieces(judge, "test", target, same=False)
    distance_ref = held_out_pieces(judge, "val", target, same=True)
    guard = check_overlaps(judge, runs, ref, [str(p) for _, p in [*others, *distance_ref]],
                           bool(cfg.get("force", False)))
    return StylePlan(judge, target, window, hop, others, distance_ref, guard)


def style_section(cfg, plan: StylePlan, systems, human, floor, per_system: int,
                  seconds: float, n_boot: int, seed: int) -> tuple[dict, dict]:
    """(style figures per row name, the section's facts for the report): the judge of
    `cfg.judge.run` over every branch, the human ceiling, the random-notes floor and the
    other pianists' held-out clips (a second floor, `per_system` clips of `seconds`)."""
    judge, target, window, hop = plan.judge, plan.target, plan.window, plan.hop
    others, distance_ref = plan.others, plan.distance_ref
    t = judge.class_index(target)
    facts = {"judge_run": str(cfg.judge.run), "judge_checkpoint": str(judge.ckpt),
             "target": target, "classes": judge.classes, "judge_clip_seconds": judge.seconds,
             "clip_seconds": seconds, "window_seconds": window, "hop_seconds": hop}
    rep = judge.report or {}
    facts["judge_test"] = {k: rep.get(k) for k in ("piece_accuracy", "clip_accuracy",
                                                   "pieces", "clips")}
    facts["guard"] = plan.guard
    if abs(judge.seconds - seconds) > 1e-6:
        warn(f"style: the judge learned {judge.seconds:g} s clips and scores {seconds:g} s "
             f"ones here (seconds={seconds:g}); its figures are for clips shorter or longer "
             "than it was trained on")
    ref_clips = clips_of(distance_ref, seconds, None, seed)
    reference = None
    if len(ref_clips) >= 2:
        _, reference = judge.score([(c, 0.0, seconds) for _, _, c in ref_clips])
    else:
        warn(f"style: the judge's val split has {len(ref_clips)} clip of {target}; no "
             "Fréchet or kernel distance")
    facts["distance_reference"] = {"clips": len(ref_clips),
                                   "pieces": len({p for p, _, _ in ref_clips})}
    floor_clips = clips_of(others, seconds, per_system, seed)
    facts["other_pianists"] = {"clips": len(floor_clips),
                               "pieces": len({p for p, _, _ in floor_clips})}
    rows: dict[str, dict] = {}

    def measure(name: str, clips, groups) -> None:
        print(f"compare: style of {name}", file=sys.stderr)
        rows[name] = style_row(judge, t, clips, groups, seconds, window, hop, reference,
                               n_boot, seed)

    for s in [*systems, human, floor]:
        measure(s.name, [notes_array(it.notes) for it in s.items], [it.group for it in s.items])
    if floor_clips:
        measure("other pianists", [c for _, _, c in floor_clips],
                [p for p, _, _ in floor_clips])
        facts["other_pianists"]["sources"] = sorted({s for _, s, _ in floor_clips})
    else:
        warn("style: the judge's test split has no other pianist's piece; no other-pianists "
             "floor")
    ceiling = rows[human.name]
    low = rows.get("other pianists")
    for row in rows.values():
        for key in ("target_share", "target_probability"):
            top, bottom = ceiling[key][0], low[key][0] if low else math.nan
            span_ = top - bottom
            row[f"normalised_{key.split('_')[1]}"] = (
                (row[key][0] - bottom) / span_ if span_ and math.isfinite(span_) else math.nan)
    return rows, facts
