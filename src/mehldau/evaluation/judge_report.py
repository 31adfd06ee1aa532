"""The style judge's own report, on its held-out splits: how far its verdicts can be trusted.

Written after training (`judge_report.json/.md`, `confusion.png`, `reliability.png`):
- **accuracy** per clip and per piece (a piece's clip probabilities averaged), top-5, and
  the target against the rest as ROC-AUC, on real test clips; a clip the judge gives its
  "unlike any pianist" class counts as wrong;
- **rejection** per damage family (`data.damaged_clips`): the share of the test clips,
  damaged, given to the abstain class, and the ROC-AUC of P(abstain) between damaged and
  real clips; the judges trained with one family left out each (`leave_one_out`, filled in
  by the recipe) say whether a kind of damage the judge never saw is still rejected;
- **calibration**: the temperature fitted on val (Guo et al. 2017: one scalar dividing the
  logits, fitted by likelihood) and the expected calibration error on test before and after
  (`torchmetrics`, 15 bins, L1), with the reliability diagram;
- **the embedding gate** (`style.EmbeddingGate`): its threshold set on the target's val
  clips, and the share of the target's own test clips, the other pianists' and each damaged
  family that pass it;
- **what the judge leans on**: accuracy with every clip's loudness set to the same mean
  velocity, with every clip thinned to the same density, and both (an ablation: a judge
  that falls to chance when loudness and density are matched heard loudness and density,
  which a generator can match without any style).

Every clip is cut by the one window rule (`data.clips.cut_clip`). Intervals: shares by
Wilson's interval at the Korn–Graubard effective size over pieces
(`distribution.clustered_share`), AUCs by the grouped jackknife over pieces.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mehldau.data.clips import clip_starts, cut_clip
from mehldau.data.damaged_clips import damage
from mehldau.evaluation import distribution as dist
from mehldau.evaluation.style import (
    ABSTAIN,
    CALIBRATION,
    REPORT,
    EmbeddingGate,
    Judge,
    roc_auc,
    softmax,
)
from mehldau.io import atomic_file
from mehldau.tokenize.note_list import ONSET, VELOCITY

ECE_BINS = 15


@dataclass
class HeldOut:
    """One split's labelled pieces: notes `(N, 4)`, class index and id of each."""

    notes: list[np.ndarray]
    labels: list[int]
    ids: list[str]


@dataclass
class Clips:
    """A split cut into the judge's clips (`clip_starts`, `cut_clip`)."""

    clips: list[np.ndarray]
    piece: np.ndarray  # (n,) index of the piece each clip comes from
    label: np.ndarray  # (n,) its class

    @classmethod
    def of(cls, held: HeldOut, seconds: float) -> Clips:
        clips, piece, label = [], [], []
        for k, (n, y) in enumerate(zip(held.notes, held.labels)):
            for s in clip_starts(n, seconds) if len(n) else []:
                clips.append(cut_clip(n, s, seconds))
                piece.append(k)
                label.append(y)
        return cls(clips, np.array(piece, np.int64), np.array(label, np.int64))


def damaged(clips: Sequence[np.ndarray], seconds: float, family: str, key: Sequence[int]
            ) -> list[np.ndarray]:
    """Each clip damaged by `family`, seeded by (key, its position): the same every run."""
    return [damage(c, seconds, family, np.random.default_rng([*key, i]))
            for i, c in enumerate(clips)]


def _by_piece(values, piece: np.ndarray) -> list[list]:
    out: dict[int, list] = {}
    for v, p in zip(values, piece):
        out.setdefault(int(p), []).append(v)
    return list(out.values())


def share(hit: np.ndarray, piece: np.ndarray) -> tuple[float, float, float]:
    return dist.clustered_share(_by_piece(np.asarray(hit, float), piece))


def auroc_by_piece(scores: np.ndarray, positive: np.ndarray, piece: np.ndarray
                   ) -> tuple[float, float, float]:
    """ROC-AUC with the jackknife interval over pieces (a piece's clips leave together)."""
    rows = _by_piece(list(zip(scores, positive)), piece)

    def stat(items, _):
        s, pos = zip(*items) if items else ((), ())
        return roc_auc(np.array(s), np.array(pos, bool))

    return dist.jackknife(rows, [], stat, scale="unit")


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T) on
    held-out clips (Guo et al. 2017), searched on log T in [-3, 3]."""
    from scipy.optimize import minimize_scalar

    if not len(logits):
        return 1.0
    z = torch.from_numpy(logits).double()
    y = torch.from_numpy(labels).long()

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / math.exp(log_t), y))

    return float(math.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def calibration_figures(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error (torchmetrics, L1), negative log-likelihood and the
    reliability diagram's bins (confidence, accuracy, count) of probabilities."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    p = torch.from_numpy(np.asarray(probs, np.float64)).float()
    y = torch.from_numpy(np.asarray(labels)).long()
    ece = float(multiclass_calibration_error(p, y, num_classes=p.shape[1], n_bins=bins,
                                             norm="l1"))
    nll = float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12)).mean())
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    table = [{"confidence": float(conf[which == b].mean()),
              "accuracy": float((pred == labels)[which == b].mean()),
              "count": int((which == b).sum())} for b in range(bins) if (which == b).any()]
    return {"ece": ece, "nll": nll, "bins": table}


def calibrated_ece(probs: np.ndarray, draws: int = 200, seed: int = 0, bins: int = ECE_BINS
                   ) -> tuple[float, float, float]:
    """The expected calibration error a perfectly calibrated judge would show with these
    probabilities on this many clips: labels drawn from `probs` themselves, `draws` times
    (median, 2.5th and 97.5th percentile). ECE is biased upward at small n (every bin's gap
    is at least its sampling noise), so a figure is read against this floor, as the kernel
    distance is read against its same-n baseline."""
    if not len(probs):
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    cum = np.cumsum(probs, 1)
    values = []
    for _ in range(draws):
        u = rng.random((len(probs), 1))
        labels = np.minimum((u > cum).sum(1), probs.shape[1] - 1)
        values.append(calibration_figures(probs, labels, bins)["ece"])
    lo, med, hi = np.percentile(values, [2.5, 50, 97.5])
    return float(med), float(lo), float(hi)


def accuracy_difference(judge: Judge, control: Judge, test: HeldOut, batch: int = 32
                        ) -> tuple[float, float, float]:
    """Per-clip accuracy of `judge` minus `control`'s on the same real test clips (an
    abstention counts as wrong), with the jackknife interval over pieces: the clips are
    paired, so the difference is far tighter than the two accuracies' intervals."""
    tt = Clips.of(test, judge.seconds)
    hits = [(j.score(tt.clips, j.seconds, batch)[0].argmax(1) == tt.label).astype(float)
            for j in (judge, control)]
    return dist.group_mean(_by_piece(hits[0] - hits[1], tt.piece))


def matched(clips: Sequence[np.ndarray], loudness: float | None, density: int | None,
            seed: int) -> list[np.ndarray]:
    """The ablation's clips: velocities shifted so each clip's mean is `loudness`, and/or
    each clip thinned at random to at most `density` notes."""
    out = []
    for i, c in enumerate(clips):
        c = c.copy()
        if loudness is not None and len(c):
            c[:, VELOCITY] = np.clip(np.round(c[:, VELOCITY] - c[:, VELOCITY].mean()
                                              + loudness), 1, 127)
        if density is not None and len(c) > density:
            keep = np.random.default_rng([seed, 3, i]).choice(len(c), density, replace=False)
            c = c[np.sort(keep)]
            c = c[np.argsort(c[:, ONSET], kind="stable")]
        out.append(c)
    return out


def strict_accuracy(judge: Judge, clips: Clips, items: Sequence[np.ndarray], batch: int
                    ) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(accuracy, share rejected) of `items` (the clips of `clips`, perhaps changed): an
    abstention counts as wrong."""
    probs, _ = judge.score(items, judge.seconds, batch)
    pred = probs.argmax(1)
    return (share(pred == clips.label, clips.piece),
            share(pred == judge.abstain, clips.piece) if judge.abstain is not None
            else (0.0, 0.0, 0.0))


def judge_report(judge: Judge, val: HeldOut, test: HeldOut, target: str | None,
                 families: Sequence[str], calibrate: bool = True, seed: int = 0,
                 batch: int = 32) -> dict:
    """The judge on its held-out pieces (see the module doc). Fits the temperature on val
    and sets it on `judge`."""
    from mehldau.errors import UserError

    sec = judge.seconds
    a = judge.abstain
    K = len(judge.classes)
    tv, tt = Clips.of(val, sec), Clips.of(test, sec)
    if not len(tt.clips):
        raise UserError("the judge's test split has no piece of a class it knows; use more "
                        "files or other split.ratios")
    families = list(families) if a is not None else []
    # calibration: fitted on val, real clips and (when the judge can abstain) one damaged
    # copy of each, families in turn, as the class was trained
    v_damaged = [damage(c, sec, families[i % len(families)], np.random.default_rng([seed, 1, i]))
                 for i, c in enumerate(tv.clips)] if families else []
    v_logits, v_emb = judge.logits(tv.clips, sec, batch)
    d_logits, _ = judge.logits(v_damaged, sec, batch)
    fit_logits = np.concatenate([v_logits, d_logits])
    fit_labels = np.concatenate([tv.label, np.full(len(d_logits), a if a is not None else 0)])
    judge.temperature = fit_temperature(fit_logits, fit_labels) if calibrate else 1.0

    t_logits, t_emb = judge.logits(tt.clips, sec, batch)
    probs = softmax(t_logits / judge.temperature)
    fam_logits, fam_emb = {}, {}
    for fi, f in enumerate(families):
        fam_logits[f], fam_emb[f] = judge.logits(damaged(tt.clips, sec, f, [seed, 2, fi]), sec,
                                                 batch)
    t = judge.classes.index(target) if target is not None else None

    pred = probs.argmax(1)
    pieces = sorted(set(tt.piece.tolist()))
    piece_p = np.stack([probs[tt.piece == k].mean(0) for k in pieces])
    piece_y = np.array([test.labels[k] for k in pieces])
    top5 = np.argsort(-probs, 1)[:, :5]
    piece_top5 = np.argsort(-piece_p, 1)[:, :5]
    ones = np.arange(len(pieces))
    report: dict = {
        "classes": judge.classes, "target": target, "abstain": ABSTAIN if a is not None else None,
        "chance": 1 / len(judge.pianists), "clips": len(tt.clips), "pieces": len(pieces),
        "val_clips": len(tv.clips), "clip_seconds": sec, "fps": judge.fps,
        "clip_accuracy": share(pred == tt.label, tt.piece),
        "piece_accuracy": share(piece_p.argmax(1) == piece_y, ones),
        "clip_top5": share((top5 == tt.label[:, None]).any(1), tt.piece),
        "piece_top5": share((piece_top5 == piece_y[:, None]).any(1), ones),
        "real_rejected": share(pred == a, tt.piece) if a is not None else None,
        "shuffled_labels": bool(judge.info.get("shuffled_labels", False)),
        "interval": "95 %: shares by Wilson at the Korn-Graubard effective size over pieces; "
                    "AUCs by the delete-one-piece jackknife"}
    if t is not None:
        report["clip_auc"] = auroc_by_piece(probs[:, t], tt.label == t, tt.piece)
        report["piece_auc"] = auroc_by_piece(piece_p[:, t], piece_y == t, ones)

    # the gate: set on the target's val clips, reported on test
    gate = None
    if t is not None:
        own = tv.label == t
        gate = EmbeddingGate.fit(v_emb[own], [str(p) for p in tv.piece[own]],
                                 v_emb[~own & (tv.label != a)])
    if gate is not None:
        mine = tt.label == t
        report["gate"] = {**gate.facts(), "test_pass": {
            target: share(gate.passes(t_emb[mine]), tt.piece[mine]),
            "other pianists": share(gate.passes(t_emb[~mine]), tt.piece[~mine])}}
        report["target_attributed"] = {
            target: share((pred[mine] == t) & gate.passes(t_emb[mine]), tt.piece[mine]),
            "other pianists": share((pred[~mine] == t) & gate.passes(t_emb[~mine]),
                                    tt.piece[~mine])}

    # rejection, per family: the judge's own (every family seen) and, by the recipe, judges
    # that never saw it
    fams = {}
    for f in families:
        fp = softmax(fam_logits[f] / judge.temperature)
        both = np.concatenate([probs[:, a], fp[:, a]])
        positive = np.r_[np.zeros(len(probs), bool), np.ones(len(fp), bool)]
        row = {"rejected": share(fp.argmax(1) == a, tt.piece),
               "auroc": auroc_by_piece(both, positive, np.r_[tt.piece, tt.piece])}
        if t is not None:
            hit = fp.argmax(1) == t
            row["attributed_to_target"] = share(
                hit & gate.passes(fam_emb[f]) if gate is not None else hit, tt.piece)
            if gate is not None:
                mine = tt.label == t
                row["gate_pass"] = share(gate.passes(fam_emb[f][mine]), tt.piece[mine])
        fams[f] = row
    report["families"] = fams

    # calibration on test: real clips and one damaged copy each, families in turn
    mix_logits = [t_logits] + ([np.stack([fam_logits[families[i % len(families)]][i]
                                          for i in range(len(tt.clips))])] if families else [])
    mix_labels = np.concatenate([tt.label] + ([np.full(len(tt.clips), a)] if families else []))
    mix = np.concatenate(mix_logits)
    before = calibration_figures(softmax(mix), mix_labels)
    after = calibration_figures(softmax(mix / judge.temperature), mix_labels)
    after["calibrated_floor"] = calibrated_ece(softmax(mix / judge.temperature), seed=seed)
    report["calibration"] = {"temperature": judge.temperature, "fitted": bool(calibrate),
                             "fitted_on_val_clips": len(fit_labels),
                             "test_clips": len(mix_labels), "bins": ECE_BINS,
                             "before": before, "after": after}

    # what it leans on: loudness and density matched across every real test clip
    loud = float(np.mean([c[:, VELOCITY].mean() for c in tt.clips if len(c)]))
    dense = int(np.percentile([len(c) for c in tt.clips], 20))
    ablation = {}
    for name, (lv, dn) in {"as played": (None, None), "loudness matched": (loud, None),
                           "density matched": (None, dense),
                           "loudness and density matched": (loud, dense)}.items():
        acc, rej = strict_accuracy(judge, tt, matched(tt.clips, lv, dn, seed), batch)
        ablation[name] = {"accuracy": acc, "rejected": rej}
    report["ablation"] = {"mean_velocity": loud, "notes_per_clip": dense, "rows": ablation}

    confusion = np.zeros((K, K), np.int64)
    np.add.at(confusion, (piece_y, piece_p.argmax(1)), 1)
    report.update(
        confusion=confusion.tolist(),
        per_class={c: {"pieces": int((piece_y == i).sum()),
                       "recall": float((piece_p.argmax(1)[piece_y == i] == i).mean())
                       if (piece_y == i).any() else None}
                   for i, c in enumerate(judge.classes) if c != ABSTAIN},
        piece_predictions=[{"id": test.ids[k], "class": judge.classes[int(test.labels[k])],
                            "predicted": judge.classes[int(p.argmax())],
                            "probability": round(float(p.max()), 4)}
                           for k, p in zip(pieces, piece_p)])
    return report


def rejection_of_unseen(judge: Judge, test: HeldOut, family: str, seed: int, families:
                        Sequence[str], batch: int = 32) -> dict:
    """A judge trained without `family`: how it rejects test clips damaged by it (the same
    damaged clips the main judge's report uses), uncalibrated."""
    tt = Clips.of(test, judge.seconds)
    fi = list(families).index(family)
    real, _ = judge.logits(tt.clips, judge.seconds, batch)
    bad, _ = judge.logits(damaged(tt.clips, judge.seconds, family, [seed, 2, fi]),
                          judge.seconds, batch)
    a = judge.abstain
    p, q = softmax(real), softmax(bad)
    return {"auroc": auroc_by_piece(np.r_[p[:, a], q[:, a]],
                                    np.r_[np.zeros(len(p), bool), np.ones(len(q), bool)],
                                    np.r_[tt.piece, tt.piece]),
            "rejected": share(q.argmax(1) == a, tt.piece),
            "real_rejected": share(p.argmax(1) == a, tt.piece)}


def accuracy_of(judge: Judge, test: HeldOut, batch: int = 32) -> dict:
    """Accuracy per clip and per piece on real test clips (the control without the abstain
    class)."""
    tt = Clips.of(test, judge.seconds)
    probs, _ = judge.score(tt.clips, judge.seconds, batch)
    pieces = sorted(set(tt.piece.tolist()))
    piece_p = np.stack([probs[tt.piece == k].mean(0) for k in pieces])
    piece_y = np.array([test.labels[k] for k in pieces])
    return {"clip_accuracy": share(probs.argmax(1) == tt.label, tt.piece),
            "piece_accuracy": share(piece_p.argmax(1) == piece_y, np.arange(len(pieces)))}


# --- writing ---------------------------------------------------------------------------------
def ci(v, fmt: str = "{:.3f}") -> str:
    """A figure and its interval, as every report here prints them; a missing interval is
    said, never made up."""
    if v is None or v[0] is None or (isinstance(v[0], float) and math.isnan(v[0])):
        return "n/a"
    if len(v) < 3 or v[1] is None or math.isnan(v[1]):
        return f"{fmt.format(v[0])} (no interval: one group)"
    return f"{fmt.format(v[0])} [{fmt.format(v[1])}, {fmt.format(v[2])}]"


def confused_classes(confusion: np.ndarray, target: int | None, most: int = 12) -> list[int]:
    """The classes in the most off-diagonal confusion (either way), the target always in."""
    c = np.asarray(confusion, float)
    off = c - np.diag(np.diag(c))
    weight = off.sum(0) + off.sum(1)
    order = [int(i) for i in np.argsort(-weight, kind="stable")]
    chosen = ([target] if target is not None else []) + [i for i in order if i != target]
    return sorted(chosen[:most])


def write_judge_report(report: dict, out: Path) -> None:
    """judge_report.json/.md, calibration.json, confusion.png and reliability.png into `out`
    (each atomically)."""
    from mehldau.evaluation.report import check_intervals

    check_intervals(report, "judge report")
    with atomic_file(out / REPORT) as f:
        json.dump(report, f, indent=1)
    cal = report["calibration"]
    with atomic_file(out / CALIBRATION) as f:
        json.dump({"temperature": cal["temperature"], "fitted": cal["fitted"]}, f, indent=1)
    t = report["classes"].index(report["target"]) if report.get("target") else None
    keep = confused_classes(np.array(report["confusion"]), t)
    _confusion_png(np.array(report["confusion"])[np.ix_(keep, keep)],
                   [report["classes"][i] for i in keep], out / "confusion.png")
    _reliability_png(cal, out / "reliability.png")
    with atomic_file(out / "judge_report.md") as f:
        f.write(markdown(report))


def markdown(report: dict) -> str:
    target, a = report.get("target"), report.get("abstain")
    lines = [
        f"# Style judge report: {report.get('run', '')}", "",
        f"Test split: {report['pieces']} pieces, {report['clips']} clips of "
        f"{report['clip_seconds']:g} s at {report['fps']} frames/s; "
        f"{len(report['classes'])} classes ({'with' if a else 'without'} the abstain class "
        f"*{a or ABSTAIN}*; chance among pianists {report['chance']:.3f}). Intervals: "
        f"{report['interval']}."
        + (" **Trained on shuffled labels (a control).**" if report["shuffled_labels"] else ""),
        "", "| figure | per clip | per piece |", "|---|---|---|",
        f"| accuracy (top-1; an abstention counts as wrong) | {ci(report['clip_accuracy'])} | "
        f"{ci(report['piece_accuracy'])} |",
        f"| top-5 | {ci(report['clip_top5'])} | {ci(report['piece_top5'])} |"]
    if target:
        lines.append(f"| ROC-AUC, {target} vs rest | {ci(report['clip_auc'])} | "
                     f"{ci(report['piece_auc'])} |")
    if a:
        lines.append(f"| real clips given to *{a}* | {ci(report['real_rejected'])} | |")
    control = report.get("without_abstain")
    if control:
        lines += ["", f"The same judge trained without the abstain class (`{control['run']}`): "
                  f"accuracy {ci(control['clip_accuracy'])} per clip, "
                  f"{ci(control['piece_accuracy'])} per piece; with it, "
                  + (f"{ci(control['difference'], '{:+.3f}')} per clip (paired: the same "
                     "clips, the jackknife over pieces)." if control.get("difference") else
                     f"{report['clip_accuracy'][0] - control['clip_accuracy'][0]:+.3f} per "
                     "clip.")]
    fams = report.get("families") or {}
    if fams:
        lofo = report.get("leave_one_out") or {}
        lines += ["", f"## Rejection: clips no pianist played, given to *{a}*", "",
                  "Each family damages every test clip (`mehldau.data.damaged_clips`). "
                  "**rejected**: the share given to the abstain class; **AUROC**: P(abstain) "
                  "of the damaged clips against the real ones. *Left out*: a judge trained "
                  "the same way without that family, so the figure is for damage it never "
                  "saw." + (" **attributed to target**: argmax the target and past the gate."
                            if target else ""), "",
                  "| family | rejected | AUROC | attributed to target | left out: rejected | "
                  "left out: AUROC |", "|---|---|---|---|---|---|"]
        for f, row in fams.items():
            held = lofo.get(f) or {}
            lines.append(f"| {f} | {ci(row['rejected'])} | {ci(row['auroc'])} | "
                         f"{ci(row.get('attributed_to_target'))} | "
                         f"{ci(held.get('rejected'))} | {ci(held.get('auroc'))} |")
        if not lofo:
            lines += ["", "Left-out judges: not trained (judge.abstain.leave_one_out=false)."]
    cal = report["calibration"]
    lines += ["", "## Calibration", "",
              f"Temperature {cal['temperature']:.3f}, "
              + (f"fitted on {cal['fitted_on_val_clips']} val clips (real, and one damaged "
                 "copy each) by likelihood (Guo et al. 2017)" if cal["fitted"] else
                 "not fitted (judge.calibrate=false)")
              + f". On {cal['test_clips']} test clips, the same mix, {cal['bins']} bins:", "",
              "| | expected calibration error ↓ | negative log-likelihood ↓ |", "|---|---|---|",
              f"| before | {cal['before']['ece']:.4f} | {cal['before']['nll']:.4f} |",
              f"| after | {cal['after']['ece']:.4f} | {cal['after']['nll']:.4f} |", ""]
    floor = cal["after"].get("calibrated_floor")
    if floor:
        lines += [f"A perfectly calibrated judge with the same probabilities, its labels drawn "
                  f"from them, would read ECE {floor[0]:.4f} (95 % of draws in "
                  f"{floor[1]:.4f}–{floor[2]:.4f}) on these {cal['test_clips']} clips: at "
                  "this size, the part of the ECE above that range is miscalibration, the "
                  "rest is noise.", ""]
    lines += ["![reliability diagram](reliability.png)"]
    gate = report.get("gate")
    if gate:
        lines += ["", "## Embedding gate", "",
                  f"A clip counts for {target} only if its mean cosine distance to its "
                  f"{gate['k']} nearest {target} val clips ({gate['reference_clips']}) is at "
                  f"most {gate['threshold']:.4f}: set on val, the distance that best tells "
                  f"{target}'s val clips (each against {target}'s other val pieces; "
                  f"{gate['val_own_pass']:.0%} pass) from the other pianists' val clips "
                  f"({gate['val_other_pass'] or 0:.0%} of {gate['val_other_clips']} pass). "
                  "Share of test clips that pass:", "",
                  "| clips | pass the gate | attributed to target |", "|---|---|---|"]
        for who, v in gate["test_pass"].items():
            lines.append(f"| {who} | {ci(v)} | {ci(report['target_attributed'][who])} |")
    abl = report["ablation"]
    lines += ["", "## What it leans on", "",
              f"Accuracy on the real test clips with every clip's mean velocity set to "
              f"{abl['mean_velocity']:.0f} (loudness matched) and every clip thinned at random "
              f"to at most {abl['notes_per_clip']} notes (density matched: the 20th percentile "
              "of notes per clip). A large drop says the judge hears loudness or density, "
              "which a generator can match without any style.", "",
              "| clips | accuracy | given to the abstain class |", "|---|---|---|"]
    for name, row in abl["rows"].items():
        lines.append(f"| {name} | {ci(row['accuracy'])} | {ci(row['rejected'])} |")
    lines += ["", "| class | test pieces | recall (per piece) |", "|---|---|---|"]
    for c, v in report["per_class"].items():
        r = "–" if v["recall"] is None else f"{v['recall']:.2f}"
        lines.append(f"| {c} | {v['pieces']} | {r} |")
    lines += ["", "![confusion matrix of the most confused classes](confusion.png)", ""]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _confusion_png(confusion: np.ndarray, names: list[str], path: Path) -> None:
    plt = _plt()
    rows = confusion.sum(1, keepdims=True)
    frac = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    size = 2.5 + 0.45 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("attributed to")
    ax.set_ylabel("played by")
    for i in range(len(names)):
        for j in range(len(names)):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="share of the row's test pieces")
    ax.set_title("Style judge: test pieces (most confused classes)")
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


def _reliability_png(cal: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="calibrated")
    for key, colour in (("before", "C1"), ("after", "C0")):
        b = cal[key]["bins"]
        conf, acc = [x["confidence"] for x in b], [x["accuracy"] for x in b]
        label = f"{key} (ECE {cal[key]['ece']:.3f})"
        floor = cal[key].get("calibrated_floor")
        if floor:
            label += f"; perfectly calibrated: {floor[1]:.3f}–{floor[2]:.3f}"
        ax.plot(conf, acc, "-", color=colour, lw=1, label=label)
        # a bin's dot grows with its clips: a bin of three says little
        ax.scatter(conf, acc, s=[8 + 200 * x["count"] / cal["test_clips"] for x in b],
                   color=colour, zorder=3)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"Reliability on {cal['test_clips']} test clips, temperature "
                 f"{cal['temperature']:.2f}\n(dot area: clips in the bin)", fontsize=9)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
