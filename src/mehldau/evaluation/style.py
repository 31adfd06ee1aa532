"""Style in numbers: the style judge (`mehldau.recipes.style_judge`) loaded and run over
clips, and what it says in a comparison: whose music it thinks each row plays.

Per system (`style_row`), on clips cut by the one window rule (`data.clips.cut_clip`):
- **attributed to target**: the share of clips whose most likely class is the target *and*
  whose embedding lies as close to the target's held-out clips as the target's own clips do
  (`EmbeddingGate`); **unlike any pianist**: the share the judge gives its abstain class
  (`data.damaged_clips`), so random notes or held clusters are said to be no one's, not the
  nearest pianist's; mean P(target) (temperature-calibrated on val); the sliding-window
  share (argmax only);
- **normalised**: (row − floor) / (ceiling − floor), clipped to [0, 1], where the ceiling is
  the human row and the floor the higher of the other pianists' and the random notes'
  attributed shares; "n/a" with the reason when the ceiling's and the floor's intervals
  overlap (the judge does not tell the pianist from the floor at this sample size);
- **kernel distance** in the judge's penultimate layer to the target's val clips (KID's
  unbiased MMD², pairs of one prompt or one piece left out), with its interval and a
  same-size baseline: the target's own test clips, as many as the row has, against the same
  val clips; the **Fréchet distance** only with its n and that baseline (it is biased upward
  at small n: two sets from one 64-d standard normal give ~120 at n = 6, ~44 at
  n = 50, ~2 at n = 1,000).

Intervals: shares by Wilson's interval at the Korn–Graubard effective sample size
(`distribution.clustered_share`), the rest by the grouped jackknife over prompts (floors:
over pieces) (`distribution.jackknife_many`): see there for why.

The judge's own report (accuracy, rejection, calibration, gate, ablation) is
`evaluation.judge_report`.
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

from mehldau.data.clips import cut_clip, render_clip, windows_after
from mehldau.errors import UserError
from mehldau.evaluation import distribution as dist
from mehldau.nn.performer_classifier import PerformerClassifier, PerformerClassifierConfig
from mehldau.train.checkpoint import load_weights, read_meta, resolve_checkpoint

REPORT = "judge_report.json"
CALIBRATION = "calibration.json"  # beside the judge's report: the val-fitted temperature
ABSTAIN = "unlike any pianist"  # the judge's abstain class (`data.damaged_clips`)


@dataclass
class Judge:
    model: PerformerClassifier
    classes: list[str]
    seconds: float  # the clip length it was trained on
    fps: int
    ckpt: Path
    info: dict  # its classes.json
    report: dict | None  # its judge_report.json, when written
    temperature: float = 1.0  # fitted on val after training (`CALIBRATION`); 1 = none

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def abstain(self) -> int | None:
        return self.classes.index(ABSTAIN) if ABSTAIN in self.classes else None

    @property
    def pianists(self) -> list[str]:
        return [c for c in self.classes if c != ABSTAIN]

    def class_index(self, name: str) -> int:
        if name not in self.pianists:
            names = self.pianists
            more = ", ..." if len(names) > 12 else ""
            raise UserError(f"judge.target '{name}' is not one of the judge's pianists "
                            f"({', '.join(names[:12])}{more}); pass one of them")
        return self.classes.index(name)

    @torch.no_grad()
    def logits(self, clips: Sequence[np.ndarray], seconds: float, batch: int = 32
               ) -> tuple[np.ndarray, np.ndarray]:
        """Clips `(N, 4)` already cut to start at 0 and last `seconds` -> (logits (n, K),
        embeddings (n, C))."""
        logits, embs = [], []
        for i in range(0, len(clips), batch):
            ch = self.model.config.in_channels
            x = torch.from_numpy(np.stack([render_clip(c, 0.0, seconds, self.fps, ch)
                                           for c in clips[i:i + batch]]))
            x = x.reshape(len(x), ch, 88, -1)
            out = self.model(x.to(self.device))
            logits.append(out.logits.float().cpu().numpy())
            embs.append(out.embedding.float().cpu().numpy())
        k, c = len(self.classes), self.model.head.in_features
        return (np.concatenate(logits) if logits else np.zeros((0, k)),
                np.concatenate(embs) if embs else np.zeros((0, c)))

    def score(self, clips: Sequence[np.ndarray], seconds: float, batch: int = 32
              ) -> tuple[np.ndarray, np.ndarray]:
        """(calibrated probabilities (n, K), embeddings (n, C)) of cut clips."""
        logits, emb = self.logits(clips, seconds, batch)
        return softmax(logits / self.temperature), emb


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True) if len(logits) else logits
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True) if len(logits) else e


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
    report, temperature = None, 1.0
    for d in (ckpt, ckpt.parent):
        if report is None and (d / REPORT).is_file():
            report = json.loads((d / REPORT).read_text())
        if temperature == 1.0 and (d / CALIBRATION).is_file():
            temperature = float(json.loads((d / CALIBRATION).read_text())["temperature"])
    return Judge(model.to(device).eval(), list(info["classes"]), float(info["seconds"]),
                 int(info["fps"]), ckpt, info, report, temperature)


# --- figures shared by the judge's report and the comparison ---------------------------------
def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney U statistic, ties counted half); NaN when
    one side is empty."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class EmbeddingGate:
    """A clip counts for the target only if its embedding lies as close to the target's
    held-out (val) clips as the target's own clips do: its mean cosine distance to its `k`
    nearest target val clips is at most `threshold`. Why: the classifier's head must send
    every clip to some side of a boundary; a clip far from everything the target played is
    not the target's, whatever side it lands on.

    The threshold is set on val, from two samples: the target's val clips, each against the
    target's *other* val pieces (never its own piece), and the other pianists' val clips
    against the target's. It is the distance that tells these apart best (the most of both
    on their right side; the geometric midpoint of the gap when they do not overlap). Not a
    quantile of the target's distances alone: a val split is often one album, whose pieces
    lie closer to each other than to another album of the same player, so such a quantile
    turned away a quarter of the target's test clips in this project's synthetic pianists
    while the other pianists sat ten times farther."""

    reference: np.ndarray  # (n, C) L2-normalised val embeddings of the target
    threshold: float
    k: int
    own: np.ndarray  # the target's val clips' distances (to the target's other pieces)
    others: np.ndarray  # the other pianists' val clips' distances

    @classmethod
    def fit(cls, emb: np.ndarray, pieces: Sequence[str], other_emb: np.ndarray, k: int = 5
            ) -> EmbeddingGate | None:
        """None with fewer than two reference clips (no distance to set a threshold by)."""
        ref = _unit(emb)
        pieces = np.asarray(pieces)
        if len(ref) < 2:
            return None
        own = np.array([_knn(ref[i:i + 1], ref[pieces != pieces[i]] if len(set(pieces)) > 1
                             else np.delete(ref, i, 0), k)[0] for i in range(len(ref))])
        others = _knn(_unit(other_emb), ref, k) if len(other_emb) else np.zeros(0)
        return cls(ref, _separating(own, others), k, own, others)

    def distance(self, emb: np.ndarray) -> np.ndarray:
        return _knn(_unit(emb), self.reference, self.k)

    def passes(self, emb: np.ndarray) -> np.ndarray:
        return self.distance(emb) <= self.threshold + 1e-12 if len(emb) else np.zeros(0, bool)

    def facts(self) -> dict:
        return {"threshold": self.threshold, "k": self.k, "reference_clips": len(self.reference),
                "val_own_pass": float((self.own <= self.threshold).mean()),
                "val_other_clips": len(self.others),
                "val_other_pass": float((self.others <= self.threshold).mean())
                if len(self.others) else None}


def _separating(own: np.ndarray, others: np.ndarray) -> float:
    """The threshold with the highest balanced accuracy (own at or below, others above),
    at geometric midpoints between neighbouring distances; without others, the largest own
    distance."""
    own = np.sort(np.maximum(own, 1e-9))
    if not len(others):
        return float(own[-1])
    others = np.maximum(others, 1e-9)
    values = np.unique(np.concatenate([own, others]))
    cands = np.sqrt(values[:-1] * values[1:]) if len(values) > 1 else values
    score = [(own <= c).mean() + (others > c).mean() for c in cands]
    best = max(score)
    # of equally good thresholds, the largest: a tie goes to passing the target's own clips
    return float(max(c for c, sc in zip(cands, score) if sc >= best - 1e-12))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _knn(x: np.ndarray, ref: np.ndarray, k: int) -> np.ndarray:
    """Mean cosine distance of each row of x to its min(k, len(ref)) nearest rows of ref."""
    if not len(x):
        return np.zeros(0)
    d = 1.0 - x @ ref.T
    kk = max(1, min(k, d.shape[1]))
    return np.sort(d, axis=1)[:, :kk].mean(1)


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


def kernel_distance(a: np.ndarray, b: np.ndarray, groups_a: Sequence | None = None,
                    groups_b: Sequence | None = None) -> float:
    """Unbiased MMD² with k(x, y) = (x·y / d + 1)³ (KID's kernel). With groups, pairs within
    one group (two clips of one prompt, of one piece) are left out of each set's own term,
    as a clip is left out of its pair with itself: clips of one prompt are alike, and would
    otherwise make a set look farther from every other than it is."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    d = a.shape[1]

    def within(x, groups) -> float:
        k = (x @ x.T / d + 1) ** 3
        g = np.arange(len(x)) if groups is None else np.asarray(groups)
        mask = g[:, None] != g[None, :]
        return float(k[mask].mean()) if mask.any() else math.nan

    return within(a, groups_a) + within(b, groups_b) - 2 * float(((a @ b.T / d + 1) ** 3).mean())


def warn(message: str) -> None:
    print(f"compare: {message}", file=sys.stderr)


# --- clips for the comparison ---------------------------------------------------------------
def notes_array(notes) -> np.ndarray:
    """`features.Notes` -> the judge's `(N, 4)` rows (onset, end, pitch, velocity)."""
    return np.stack([notes.onset, notes.end, notes.pitch, notes.velocity], 1).astype(
        np.float32).reshape(-1, 4)


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


def clips_after(pieces: Sequence[tuple[str, Path]], offset: float, seconds: float,
                count: int | None, seed: int) -> list[tuple[str, str, np.ndarray]]:
    """(piece id, source path, clip) of held-out pieces, cut as `mehldau-compare` cuts every
    row (the same reader, `features.read_notes`, and the same rule, `windows_after` and
    `cut_clip`: the `seconds` after a prompt of `offset` seconds, then the next `seconds`,
    ...); with `count`, that many, dealt round-robin over pieces in a seeded order so every
    piece gives clips before any gives two."""
    from mehldau.data.corpus import BadMidi
    from mehldau.evaluation.features import read_notes

    per_piece = []
    for pid, path in pieces:
        if not path.is_file():
            warn(f"style: held-out piece {path} is missing; left out")
            continue
        try:
            notes = notes_array(read_notes(path))
        except (BadMidi, OSError, RuntimeError, ValueError) as e:
            warn(f"style: skipped {path}: {e}")
            continue
        clips = [(pid, str(path), cut_clip(notes, s, seconds))
                 for s in windows_after(notes, offset, seconds)]
        if clips:
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


# --- one row's figures -----------------------------------------------------------------------
def _grouped(values: np.ndarray, groups: Sequence[str]) -> list[list[float]]:
    by: dict[str, list[float]] = {}
    for v, g in zip(values, groups):
        by.setdefault(g, []).append(float(v))
    return list(by.values())


@dataclass
class Scored:
    """One row's clips as the judge saw them."""

    probs: np.ndarray  # (n, K) calibrated
    emb: np.ndarray  # (n, C)
    groups: list[str]  # interval units: prompts (a floor's: its pieces)
    window_hits: np.ndarray  # (n,) share of each clip's windows whose argmax is the target

    def attributed(self, t: int, gate: EmbeddingGate | None) -> np.ndarray:
        hit = self.probs.argmax(1) == t if len(self.probs) else np.zeros(0, bool)
        return hit & gate.passes(self.emb) if gate is not None else hit


def score_row(judge: Judge, t: int, clips: Sequence[np.ndarray], groups: Sequence[str],
              seconds: float, window: float, hop: float) -> Scored:
    probs, emb = judge.score(clips, seconds)
    starts = np.arange(0.0, max(seconds - window, 0.0) + 1e-9, hop)
    w_probs, _ = judge.score([cut_clip(c, float(s), window) for c in clips for s in starts],
                             window)
    hits = ((w_probs.argmax(1) == t).reshape(len(clips), len(starts)).mean(1)
            if len(clips) else np.zeros(0))
    return Scored(probs, emb, list(groups), hits)


def kernel_with_interval(emb: np.ndarray, groups: Sequence[str], ref: np.ndarray,
                         ref_groups: Sequence[str]) -> tuple[float, float, float]:
    """The kernel distance of `emb` to `ref` with the jackknife interval over both sides'
    groups (prompts; reference pieces)."""
    def side(e, g):
        by: dict[str, list] = {}
        for x, name in zip(e, g):
            by.setdefault(name, []).append((name, x))
        return list(by.values())

    def stat(a, b):
        if len(a) < 2 or len(b) < 2:
            return math.nan
        return kernel_distance(np.stack([x for _, x in a]), np.stack([x for _, x in b]),
                               [g for g, _ in a], [g for g, _ in b])

    return dist.jackknife(side(emb, groups), side(ref, ref_groups), stat)


def same_n_baseline(own: np.ndarray, own_groups: Sequence[str], ref: np.ndarray,
                    ref_groups: Sequence[str], n: int, draws: int, seed: int) -> dict:
    """What the target's own held-out (test) clips score against the reference at a row's n:
    the median and the central 95 % of the kernel and Fréchet distances over `draws` draws of
    n clips without replacement (with replacement, pairs of one source clip left out, when
    fewer than n)."""
    rng = np.random.default_rng(seed)
    if len(own) < 2 or n < 2:
        return {"n": n, "draws": 0}
    kid, fd = [], []
    own_groups = np.asarray(own_groups)
    for _ in range(draws):
        idx = rng.choice(len(own), n, replace=len(own) < n)
        groups = [f"{own_groups[i]}#{i}" if len(own) < n else own_groups[i] for i in idx]
        kid.append(kernel_distance(own[idx], ref, groups, ref_groups))
        fd.append(frechet_distance(own[idx], ref))

    def summary(v):
        v = np.asarray(v, float)
        v = v[np.isfinite(v)]
        return [float(np.median(v)), *map(float, np.percentile(v, [2.5, 97.5]))] if len(v) \
            else [math.nan] * 3

    return {"n": n, "draws": draws, "pool": len(own), "kernel": summary(kid),
            "frechet": summary(fd)}


# --- the comparison's style section ------------------------------------------------------------
@dataclass
class StylePlan:
    """What `open_judge` settled before anything is generated."""

    judge: Judge
    target: str
    window: float
    hop: float
    others: list[tuple[str, Path]]  # the other classes' test pieces: the second floor
    distance_ref: list[tuple[str, Path]]  # the target's val pieces: gate and distances
    others_val: list[tuple[str, Path]]  # the other classes' val pieces: the gate's threshold
    own_test: list[tuple[str, Path]]  # the target's test pieces: the same-n baseline
    guard: dict
    baseline_draws: int


def open_judge(cfg, runs, ref: Sequence[tuple[str, Path]]) -> StylePlan:
    """The judge `cfg.judge.run` names, its target, window settings and the guard rails
    checked (`check_overlaps`): all before anything is generated."""
    from mehldau.generation import device_for

    judge = load_judge(str(cfg.judge.run), device_for(str(cfg.device)))
    if judge.abstain is None:
        raise UserError(f"judge {cfg.judge.run} has no '{ABSTAIN}' class, so it must name a "
                        "pianist for anything, random notes included; retrain it with "
                        "mehldau-train branch=style_judge (judge.abstain.families)")
    target = str(cfg.judge.target)
    judge.class_index(target)
    seconds, j = float(cfg.seconds), cfg.judge
    window = float(j.window_seconds) if j.get("window_seconds") else seconds / 2
    hop = float(j.hop_seconds) if j.get("hop_seconds") else window / 2
    if not (0 < window <= seconds and hop > 0):
        raise UserError(f"judge.window_seconds must be in (0, seconds={seconds:g}] and "
                        f"judge.hop_seconds > 0, got {window:g} and {hop:g}")
    draws = int(j.get("baseline_draws", 200))
    if draws < 1:
        raise UserError(f"judge.baseline_draws must be >= 1, got {draws}")
    others = held_out_pieces(judge, "test", target, same=False)
    distance_ref = held_out_pieces(judge, "val", target, same=True)
    others_val = held_out_pieces(judge, "val", target, same=False)
    own_test = held_out_pieces(judge, "test", target, same=True)
    guard = check_overlaps(judge, runs, ref, [str(p) for _, p in [*others, *distance_ref,
                                                                   *others_val]],
                           bool(cfg.get("force", False)))
    return StylePlan(judge, target, window, hop, others, distance_ref, others_val, own_test,
                     guard, draws)


def _normalised(hits: dict[str, np.ndarray], groups: dict[str, list[str]], row: str,
                ceiling: str, floors: list[str]) -> tuple[float, float, float]:
    """(row − floor) / (ceiling − floor) of the attributed shares (`hits`: each clip's 0/1),
    clipped to [0, 1], the floor the higher of `floors`; the jackknife interval over prompts
    (the row, the ceiling and a prompt-shaped floor answer the same prompts) and over the
    pieces of a floor cut from other pieces."""
    prompts = set(groups[ceiling])
    names = list(dict.fromkeys([row, ceiling, *floors]))
    by_prompt = [n for n in names if set(groups[n]) <= prompts]
    by_piece = [n for n in names if n not in by_prompt]
    masks = {n: np.asarray(groups[n]) for n in names}

    def share(n: str, kept: set) -> float:
        mask = np.isin(masks[n], list(kept))
        return float(hits[n][mask].mean()) if mask.any() else math.nan

    def stat(a, b):
        value = {n: share(n, set(a)) for n in by_prompt}
        value.update({n: share(n, set(b)) for n in by_piece})
        span_ = value[ceiling] - max(value[f] for f in floors)
        if not math.isfinite(span_) or span_ <= 0:
            return math.nan
        return float(min(max((value[row] - max(value[f] for f in floors)) / span_, 0.0), 1.0))

    pieces = sorted({g for n in by_piece for g in groups[n]})
    return dist.jackknife([[p] for p in sorted(prompts)], [[p] for p in pieces], stat,
                          scale="unit")


def style_section(cfg, plan: StylePlan, systems, human, floors, per_system: int,
                  seconds: float, seed: int) -> tuple[dict, dict]:
    """(style figures per row name, the section's facts for the report): the judge of
    `cfg.judge.run` over every branch, the human ceiling, the prompt-shaped floors (random
    notes, shuffled pitches) and the other pianists' held-out clips (`per_system` clips of
    `seconds`, cut as every row is)."""
    judge, target, window, hop = plan.judge, plan.target, plan.window, plan.hop
    t = judge.class_index(target)
    offset = float(cfg.prompt_seconds)
    facts = {"judge_run": str(cfg.judge.run), "judge_checkpoint": str(judge.ckpt),
             "target": target, "classes": judge.classes, "abstain": ABSTAIN,
             "judge_clip_seconds": judge.seconds, "clip_seconds": seconds,
             "window_seconds": window, "hop_seconds": hop, "offset_seconds": offset,
             "temperature": judge.temperature, "guard": plan.guard}
    rep = judge.report or {}
    facts["judge_test"] = {k: rep.get(k) for k in (
        "piece_accuracy", "clip_accuracy", "pieces", "clips", "real_rejected", "calibration",
        "leave_one_out", "without_abstain", "families")}
    if abs(judge.seconds - seconds) > 1e-6:
        warn(f"style: the judge learned {judge.seconds:g} s clips and scores {seconds:g} s "
             f"ones here (seconds={seconds:g}); its figures are for clips shorter or longer "
             "than it was trained on")
    ref_clips = clips_after(plan.distance_ref, offset, seconds, None, seed)
    _, reference = judge.score([c for _, _, c in ref_clips], seconds)
    ref_groups = [p for p, _, _ in ref_clips]
    _, other_val = judge.score([c for _, _, c in clips_after(plan.others_val, offset, seconds,
                                                             None, seed)], seconds)
    gate = EmbeddingGate.fit(reference, ref_groups, other_val)
    if gate is None:
        warn(f"style: the judge's val split has {len(ref_clips)} clip of {target}; no "
             "embedding gate, kernel or Fréchet distance (attribution is the argmax alone)")
    facts["distance_reference"] = {"clips": len(ref_clips), "pieces": len(set(ref_groups))}
    facts["gate"] = gate.facts() if gate is not None else None
    own = clips_after(plan.own_test, offset, seconds, None, seed)
    _, own_emb = judge.score([c for _, _, c in own], seconds)
    floor_clips = clips_after(plan.others, offset, seconds, per_system, seed)
    facts["other_pianists"] = {"clips": len(floor_clips),
                               "pieces": len({p for p, _, _ in floor_clips}),
                               "sources": sorted({s for _, s, _ in floor_clips})}
    scored: dict[str, Scored] = {}
    for s in [*systems, human, *floors]:
        print(f"compare: style of {s.name}", file=sys.stderr)
        scored[s.name] = score_row(judge, t, [notes_array(it.notes) for it in s.items],
                                   [it.group for it in s.items], seconds, window, hop)
    floor_names = [f.name for f in floors]
    if floor_clips:
        scored["other pianists"] = score_row(judge, t, [c for _, _, c in floor_clips],
                                             [p for p, _, _ in floor_clips], seconds, window,
                                             hop)
        floor_names = ["other pianists", *floor_names]
    else:
        warn("style: the judge's test split has no other pianist's piece; no other-pianists "
             "floor")
    rows: dict[str, dict] = {}
    hits = {name: s.attributed(t, gate).astype(float) for name, s in scored.items()}
    for name, s in scored.items():
        hit = hits[name]
        row = {"clips": len(s.probs),
               "target_share": dist.clustered_share(_grouped(hit, s.groups)),
               "unlike_any_pianist": dist.clustered_share(_grouped(
                   (s.probs.argmax(1) == judge.abstain).astype(float), s.groups)),
               "gate_pass": dist.clustered_share(_grouped(
                   gate.passes(s.emb).astype(float), s.groups)) if gate is not None else None,
               "target_probability": dist.group_mean(_grouped(s.probs[:, t], s.groups),
                                                     scale="unit"),
               "window_share": dist.group_mean(_grouped(s.window_hits, s.groups),
                                               scale="unit")}
        top = np.bincount(s.probs.argmax(1), minlength=len(judge.classes))
        row["attributed_to"] = {judge.classes[i]: int(top[i]) for i in np.argsort(-top)[:3]
                                if top[i]}
        if gate is not None:
            row["kernel"] = kernel_with_interval(s.emb, s.groups, reference, ref_groups)
            row["frechet"] = frechet_distance(s.emb, reference)
            row["baseline"] = same_n_baseline(own_emb, [p for p, _, _ in own], reference,
                                              ref_groups, len(s.probs), plan.baseline_draws,
                                              seed)
        rows[name] = row
    # the floor is the higher of the floors' attributed shares; the normalised score only
    # where the ceiling stands clear of it
    floor = max(floor_names, key=lambda n: rows[n]["target_share"][0])
    ceiling = rows[human.name]["target_share"]
    low = rows[floor]["target_share"]
    facts["floor"] = floor
    reason = None
    if not ceiling[1] > low[2]:
        reason = (f"the ceiling ({human.name} {ceiling[0]:.2f} [{ceiling[1]:.2f}, "
                  f"{ceiling[2]:.2f}]) and the floor ({floor} {low[0]:.2f} [{low[1]:.2f}, "
                  f"{low[2]:.2f}]) overlap: the judge does not tell the pianist from the floor "
                  "at this sample size")
    facts["normalised_reason"] = reason
    for name, row in rows.items():
        row["normalised"] = None if reason else _normalised(
            hits, {n: sc.groups for n, sc in scored.items()}, name, human.name, floor_names)
    return rows, facts
