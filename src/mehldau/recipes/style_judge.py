"""The style judge: a piano-roll ResNet trained to name the pianist of a 30 s clip, so that
`mehldau-compare` can ask of every branch "does it sound like Mehldau?" (Cheston, Bance &
Harrison 2025; Edwards, Maezawa & Dixon 2026 score generated music this way).

    mehldau-train branch=style_judge data=pijama data.root=~/pijama data.pianist=null
    mehldau-train branch=style_judge data=folder data.root=~/players data.group_by=album

A model kind of the core, not a fifth branch: it generates nothing, and the comparison that
reads it is core code. It is trained like every branch (the shared trainer, its memory plan,
checkpoints, resume, logger, Hydra configs) on the catalogue-stable album splits the
generators use, so its held-out clips are never a generator's training music when both read
one catalogue (`mehldau-compare` checks this by content hash).

Classes: with PiJAMA, every pianist with at least `judge.min_minutes` of training-split music,
the others pooled as `other` (`judge.other=false` leaves them out); with a folder, every
top-level folder (`data.group_by=album` groups a `pianist/album/` tree by album); and one
more, "unlike any pianist", trained on clips damaged on the fly (`data.damaged_clips`, the
families in `judge.abstain.families`), so the judge can say that music is no pianist's. The
loss is weighted so each class, the abstain class included, counts alike.

After training: the temperature fitted on val, then `judge_report.md/.json`, a confusion
matrix and a reliability diagram on the test split (`evaluation.judge_report`). With
`judge.abstain.leave_one_out` (default), the same judge is trained once more per family
with that family left out, and once without the abstain class, each under
`<run>/controls/`: the report then says how it rejects damage it never saw, and what the
abstain class costs in accuracy. These controls cost one training each.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from mehldau.data.clips import (
    ClipAugmentation,
    ClipDataset,
    ClipWindows,
    Damaging,
    count_clips,
    span,
)
from mehldau.data.damaged_clips import check_families
from mehldau.data.sources import Piece
from mehldau.errors import UserError
from mehldau.evaluation.style import ABSTAIN
from mehldau.nn.performer_classifier import PerformerClassifier, PerformerClassifierConfig
from mehldau.recipes.run import (
    checkpoint_extras,
    fit_logged,
    metrics_file,
    plan_memory,
    run_corpus,
    run_dir_for,
    run_pieces,
    train_config,
)
from mehldau.tokenize.base import Tokenizer, build_tokenizer
from mehldau.train.checkpoint import latest_checkpoint
from mehldau.train.trainer import fit, make_accelerator

BRANCH = "style_judge"
OTHER = "other"
CLASSES = "classes.json"  # beside every judge checkpoint's weights
PROBE_CLASSES = 128


def model_config(cfg: DictConfig, classes: list[str]) -> PerformerClassifierConfig:
    m = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items()
         if k not in ("branch", "preset")}
    try:
        return PerformerClassifierConfig(num_classes=len(classes), class_names=classes, **m)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad model config for the style judge: {e}") from e


def judge_settings(cfg: DictConfig) -> dict:
    j = cfg.get("judge")
    if j is None:
        raise UserError("branch=style_judge needs its judge settings; compose with "
                        "branch=style_judge (not a hand-made config)")
    seconds, fps = float(j.seconds), int(j.fps)
    if not (seconds > 0 and 1 <= fps <= 1000):
        raise UserError(f"judge.seconds must be > 0 and judge.fps in 1..1000, got {seconds:g} "
                        f"and {fps}")
    if float(j.min_minutes) < 0:
        raise UserError(f"judge.min_minutes must be >= 0, got {j.min_minutes}")
    a = j.augment
    augment = ClipAugmentation(int(a.transpose), (float(a.stretch_min), float(a.stretch_max)),
                               int(a.velocity), float(a.p))
    ab = j.abstain
    families = check_families(ab.families or [])
    share = None if ab.share is None else float(ab.share)
    if share is not None and not 0 < share < 1:
        raise UserError(f"judge.abstain.share must be in (0, 1) or null, got {share:g}")
    return {"seconds": seconds, "fps": fps, "min_minutes": float(j.min_minutes),
            "other": bool(j.other), "target": j.get("target"), "augment": augment,
            "shuffle_labels": bool(j.shuffle_labels), "families": families,
            "share": share, "leave_one_out": bool(ab.leave_one_out) and bool(families),
            "calibrate": bool(j.calibrate)}


def _tokenizer(cfg: DictConfig) -> Tokenizer:
    return build_tokenizer(cfg.branch.tokenizer.name,
                           OmegaConf.to_container(cfg.branch.tokenizer.config, resolve=True))


def choose_classes(train: list[tuple[Piece, np.ndarray]], source: str, min_minutes: float,
                   other: bool) -> tuple[list[str], dict[str, str | None], dict[str, float]]:
    """(classes, class of each style or None when left out, training minutes per style).
    PiJAMA: styles with >= `min_minutes` of training music are classes, the rest `other`
    (when `other`, and when there are any); any other source: every style that trains."""
    minutes: dict[str, float] = {}
    for piece, notes in train:
        a, b = span(notes)
        minutes[piece.style] = minutes.get(piece.style, 0.0) + (b - a) / 60
    if source == "pijama":
        named = sorted(s for s, m in minutes.items() if m >= min_minutes)
        rest = sorted(s for s in minutes if s not in named)
    else:
        named, rest = sorted(minutes), []
    pooled = other and bool(rest)
    classes = named + ([OTHER] if pooled else [])
    class_of: dict[str, str | None] = {s: s for s in named}
    class_of.update({s: OTHER if pooled else None for s in rest})
    return classes, class_of, minutes


def train(cfg: DictConfig) -> Path:
    j = judge_settings(cfg)
    source = cfg.data.get("source")
    if source == "demo":
        raise UserError("the demo corpus has no pianists to tell apart; use data=pianists "
                        "(synthetic pianists), data=pijama data.pianist=null or data=folder "
                        "(one class per top-level folder)")
    if source in ("pijama", "pianists") and cfg.data.get("pianist"):
        raise UserError(f"data.pianist={cfg.data.pianist} keeps one pianist, and the judge "
                        "tells pianists apart; add data.pianist=null")
    if cfg.stage != "pretrain" or cfg.init is not None:
        raise UserError("the style judge trains from scratch: drop stage= and init=")
    if cfg.style.enabled:
        raise UserError("the style judge takes no style token; drop style.enabled")
    tcfg = train_config(cfg)
    accelerator = make_accelerator(tcfg.mixed_precision)
    run_dir = run_dir_for(cfg, f"{BRANCH}/", tcfg.resume)
    accelerator.wait_for_everyone()
    tokenizer = _tokenizer(cfg)

    # The memory plan before any data is listed or read, on made-up clips at full length and
    # a head of PROBE_CLASSES (more than PiJAMA's 120 pianists; the head is a rounding error).
    set_seed(cfg.seed)
    frames = int(round(j["seconds"] * j["fps"]))
    names = [f"class {k}" for k in range(PROBE_CLASSES)]
    probe = PerformerClassifier(model_config(cfg, names))
    channels = int(cfg.model.get("in_channels", 1))
    items = [{"x": torch.rand(channels, 88, frames), "labels": torch.tensor(i % PROBE_CLASSES)}
             for i in range(tcfg.batch_size)]
    tcfg = plan_memory(tcfg, accelerator, probe, items)
    del probe

    pieces = run_pieces(cfg)
    corpus = run_corpus(cfg, pieces, tokenizer, run_dir, None, tcfg.resume, accelerator)
    classes, class_of, minutes = choose_classes(corpus.splits["train"], str(source),
                                                j["min_minutes"], j["other"])
    if ABSTAIN in classes:
        raise UserError(f"a style is named '{ABSTAIN}', the judge's abstain class; rename "
                        "that folder or pianist")
    if len(classes) < 2:
        raise UserError(f"the training split has {len(classes)} class ({', '.join(classes)}); "
                        "the judge needs two or more: lower judge.min_minutes or add pianists")
    index = {c: k for k, c in enumerate(classes)}

    def labelled(split: str) -> tuple[list[np.ndarray], list[int], list[Piece]]:
        kept = [(p, n) for p, n in corpus.splits[split] if class_of.get(p.style) is not None]
        return [n for _, n in kept], [index[class_of[p.style]] for p, _ in kept], \
            [p for p, _ in kept]

    train_notes, train_labels, _ = labelled("train")
    if j["shuffle_labels"]:  # the control: labels dealt at random over the training pieces
        train_labels = list(np.random.default_rng(cfg.seed).permutation(train_labels))
    val_notes, val_labels, _ = labelled("val")
    dropped = sum(class_of.get(p.style) is None for s in corpus.splits
                  for p, _ in corpus.splits[s])
    class_minutes = {c: sum(m for s, m in minutes.items() if class_of[s] == c) for c in classes}
    summary = ", ".join(f"{c} {class_minutes[c]:.0f}" for c in classes[:8])
    more = ", ..." if len(classes) > 8 else ""
    left = f"; {dropped} pieces of styles with no class left out" if dropped else ""
    print(f"judge: {len(classes)} classes (training minutes: {summary}{more}){left}",
          file=sys.stderr)

    families = j["families"]
    pianists = classes
    share = j["share"] if j["share"] is not None else 1 / (len(pianists) + 1)
    class_minutes = {c: sum(m for s, m in minutes.items() if class_of[s] == c) for c in classes}
    class_file = {"classes": classes, "class_of_style": class_of,
                  "training_minutes": {c: round(m, 2) for c, m in class_minutes.items()},
                  "seconds": j["seconds"], "fps": j["fps"], "source": source,
                  "shuffled_labels": j["shuffle_labels"],
                  "pieces": {s: {p.id: class_of.get(p.style) for p, _ in corpus.splits[s]}
                             for s in corpus.splits}}
    meta = {"branch": BRANCH, "recipe": __name__, "model": "PerformerClassifier",
            "stage": "pretrain"}

    def build(fams: list[str]) -> tuple[PerformerClassifier, ClipDataset, ClipWindows | None,
                                        dict, object]:
        """A judge to train on `fams` (none: no abstain class), its data and checkpoint
        extras, from the run's seed: the main judge and every control start alike."""
        names = pianists + ([ABSTAIN] if fams else [])
        damaging = Damaging(tuple(fams), share, len(pianists)) if fams else None
        set_seed(cfg.seed)
        mcfg = model_config(cfg, names)
        model = PerformerClassifier(mcfg)
        total = sum(class_minutes.values())
        k = len(pianists)
        weights = [total / (k * max(class_minutes[c], 1e-6)) for c in pianists]
        if fams:  # pianist clips come (1 - share) of the time: the class weighs as one of them
            weights.append((1 - share) / (k * share))
        model.class_weights.copy_(torch.tensor(weights))
        train_ds = ClipDataset(train_notes, train_labels, j["seconds"], j["fps"], cfg.seed,
                               j["augment"], damaging=damaging, channels=mcfg.in_channels)
        val_ds = ClipWindows(val_notes, val_labels, j["seconds"], j["fps"], damaging=damaging,
                             seed=cfg.seed, channels=mcfg.in_channels) if val_notes else None
        extras = checkpoint_extras(cfg, tokenizer, mcfg.to_dict(), run_dir)
        info = {**class_file, "classes": names, "abstain": {
            "families": list(fams), "share": share if fams else None}}

        def write_extra(d: Path) -> None:
            extras(d)
            (d / CLASSES).write_text(json.dumps(info, indent=1))

        return model, train_ds, val_ds, info, write_extra

    model, train_ds, val_ds, _, write_extra = build(families)
    n = sum(p.numel() for p in model.parameters())
    abstains = f" and '{ABSTAIN}' ({len(families)} damage families, {share:.0%} of clips)" \
        if families else " (no abstain class: judge.abstain.families is empty)"
    print(f"model: style judge, {n / 1e6:.2f}M parameters, {len(pianists)} pianists"
          f"{abstains}", file=sys.stderr)
    metrics, _ = metrics_file(run_dir, tcfg.resume, {
        "pieces": sum(len(v) for v in corpus.splits.values()), "classes": classes,
        "skipped": len(corpus.skipped)}, accelerator.is_main_process)
    last = fit_logged(cfg, tcfg, run_dir, model, train_ds, val_ds, meta, write_extra,
                      accelerator, "nats/clip", count=count_clips)

    # The controls: one judge per family left out, one without the abstain class. Each is a
    # whole judge run of its own under controls/, resumed where a killed run left it.
    controls: dict[str, Path] = {}
    if j["leave_one_out"]:
        plan = [(f"without_{f}", [g for g in families if g != f]) for f in families]
        for name, fams in [*plan, ("without_abstain", [])]:
            sub = run_dir / "controls" / name
            print(f"judge: control {name} ({len(fams)} families)", file=sys.stderr)
            c_model, c_train, c_val, _, c_extra = build(fams)
            c_cfg = replace(tcfg, resume=latest_checkpoint(sub) is not None, keep_last=1,
                            ckpt_every=tcfg.max_steps, eval_every=tcfg.max_steps)
            fit(c_model, c_train, c_val, c_cfg, sub, meta, c_extra, accelerator=accelerator,
                loss_unit="nats/clip", count=count_clips)
            controls[name] = sub

    if accelerator.is_main_process:
        from mehldau.evaluation.judge_report import (
            HeldOut,
            accuracy_difference,
            accuracy_of,
            judge_report,
            rejection_of_unseen,
            write_judge_report,
        )
        from mehldau.evaluation.style import load_judge

        ckpt = latest_checkpoint(run_dir)
        judge = load_judge(ckpt, accelerator.device)
        test_notes, test_labels, test_pieces = labelled("test")
        val_pieces = labelled("val")[2]
        test = HeldOut(test_notes, test_labels, [p.id for p in test_pieces])
        val = HeldOut(val_notes, val_labels, [p.id for p in val_pieces])
        target = j["target"] if j["target"] in pianists else None
        if j["target"] and target is None:
            print(f"judge: target '{j['target']}' is not a class; no target ROC-AUC or gate "
                  f"(classes: {', '.join(pianists[:10])})", file=sys.stderr)
        report = judge_report(judge, val, test, target, families, j["calibrate"],
                              int(cfg.seed), batch=tcfg.eval_batch_size)
        if controls:
            report["leave_one_out"] = {}
            for f in families:
                sub = controls[f"without_{f}"]
                unseen = rejection_of_unseen(load_judge(sub, accelerator.device), test, f,
                                             int(cfg.seed), families, tcfg.eval_batch_size)
                report["leave_one_out"][f] = {**unseen, "run": str(sub)}
            sub = controls["without_abstain"]
            control = load_judge(sub, accelerator.device)
            report["without_abstain"] = {
                **accuracy_of(control, test, tcfg.eval_batch_size),
                "difference": accuracy_difference(judge, control, test, tcfg.eval_batch_size),
                "run": str(sub)}
        report["run"], report["checkpoint"] = str(run_dir), str(ckpt)
        report["steps"] = int(last.get("step", tcfg.max_steps))
        for d in (run_dir, ckpt):
            write_judge_report(report, d)
        metrics.write({"step": report["steps"], "split": "test",
                       **{k: report[k][0] for k in ("clip_accuracy", "piece_accuracy",
                                                    "clip_top5", "piece_top5")},
                       "ece": report["calibration"]["after"]["ece"]})
        aurocs = [v["auroc"][0] for v in (report.get("leave_one_out") or {}).values()]
        unseen = f", unseen-family rejection AUROC >= {min(aurocs):.3f}" if aurocs else ""
        print(f"judge on test: per piece {report['piece_accuracy'][0]:.3f} "
              f"[{report['piece_accuracy'][1]:.3f}, {report['piece_accuracy'][2]:.3f}], per "
              f"clip {report['clip_accuracy'][0]:.3f} ({report['pieces']} pieces, "
              f"{report['clips']} clips), ECE {report['calibration']['after']['ece']:.3f}"
              f"{unseen}; {run_dir / 'judge_report.md'}", file=sys.stderr)
    return run_dir


def _refuse(*_args, **_kwargs):
    raise UserError("a style judge scores music, it does not generate or merge; use it with "
                    "mehldau-compare judge.run=RUN")


generate = merge_checkpoint = _refuse
