"""`mehldau-compare`: every branch on the same prompts, seeds and metrics, against the same
human reference, with intervals that say when two branches are not told apart.

The protocol (what makes the comparison one to trust):
- the reference is the test split of the runs' shared manifest (or `reference=FOLDER`); runs
  split differently are refused, since one of them would be tested on pieces it trained on;
- K prompts, the first `prompt_seconds` of the first K reference pieces (sorted by id), cut
  as `mehldau-generate` cuts a prompt (`notes.cut_prompt`): every branch continues each one;
- every branch draws `samples_per_prompt` samples of `seconds` per prompt with one seed and
  one set of sampling settings (stated in the report: OA moves with temperature alone);
- what follows the prompt is compared, feature by feature, with the reference cut into
  `seconds`-long segments: mgeval's OA and KL (`distribution`) over distances between
  different pieces only (`pair_distances`), MusPy's metrics, a sliding pitch-class entropy,
  the copy check against every piece the runs trained on (`training_files`), and the
  held-out likelihood (`likelihood`), with jackknife intervals over prompts
  (`distribution.jackknife_many`: no resample ever repeats a prompt);
- three rows measured exactly as a branch's, same prompts, counts, lengths, reference and
  intervals: the human ceiling (the pianist's own continuations of the same prompts,
  `human_items`), a floor of random notes as dense as the reference, and the pianist's
  continuations with their pitches shuffled among their notes (rhythm, touch and density
  kept: the listening test's anchor, `shuffled_items`).

Comparison never trains: it reads checkpoints. Each run generates in its own process
(`worker`), which is also how its compute time and peak memory are measured.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from mehldau.data.corpus import BadMidi, read_score
from mehldau.data.splits import SPLITS, find_manifest, lineage_manifests, read_manifest
from mehldau.errors import UserError
from mehldau.evaluation import distribution as dist
from mehldau.evaluation import features as feat
from mehldau.evaluation.copying import TrainIndex, copy_report
from mehldau.evaluation.features import FEATURES, Notes, cut, read_notes
from mehldau.evaluation.likelihood import POLICY, PieceScore, summarize
from mehldau.io import atomic_dir
from mehldau.metrics import midi_files
from mehldau.tokenize.notes import cut_prompt
from mehldau.train.checkpoint import BRANCHES, read_meta, resolve_checkpoint

SUMMARY_METRICS = ("pitch_class_entropy", "scale_consistency", "polyphony", "polyphony_rate",
                   "pitch_range", "notes_per_second", "sliding_pitch_class_entropy")
# The scale each metric's interval is built on, so it stays in the metric's range with few
# prompts (t with 2 degrees of freedom is 4.3): shares in [0, 1], the rest >= 0.
METRIC_SCALES = {"scale_consistency": "unit", "polyphony_rate": "unit"}


@dataclass
class Run:
    name: str
    path: Path
    ckpt: Path
    branch: str
    recipe: str
    manifest: dict | None


@dataclass
class Item:
    """One excerpt compared: a generated or human continuation, random notes, or a reference
    segment."""

    uid: str
    group: str  # interval unit: the prompt it answers (a reference segment: its piece)
    notes: Notes
    source: str = ""  # its MIDI file
    piece: str = ""  # the reference piece its notes come from or continue: never compared
    # with that piece's own segments (default: the group)
    start: float = 0.0  # where in `source` the excerpt starts (seconds)

    def __post_init__(self) -> None:
        self.piece = self.piece or self.group


@dataclass
class System:
    name: str
    items: list[Item]
    kind: str = "branch"  # branch | ceiling | floor | reference
    extra: dict = field(default_factory=dict)


# --- inputs -------------------------------------------------------------------------------
def load_runs(paths: Sequence[str]) -> list[Run]:
    if not paths:
        raise UserError("runs= is empty; pass runs=[RUN1,RUN2,...]")
    runs, names = [], set()
    for p in paths:
        path = Path(str(p)).expanduser()
        try:
            ckpt = resolve_checkpoint(path)
        except UserError as e:
            raise UserError(f"run {path}: {e}") from e
        meta = read_meta(ckpt)
        branch = meta.get("branch")
        if branch not in BRANCHES:
            raise UserError(f"run {path} is from unknown branch '{branch}'; compare reads "
                            f"{', '.join(BRANCHES)} runs")
        if branch == "scg_diffusion" and meta.get("stage") != "diffusion":
            raise UserError(f"run {path} is an scg_diffusion {meta.get('stage')} run; pass "
                            "the stage=diffusion run that builds on it")
        name = path.name if path.name not in names else f"{path.name}-{len(runs)}"
        names.add(name)
        mpath = find_manifest(ckpt)
        runs.append(Run(name, path, ckpt, branch, f"mehldau.branches.{branch}.recipe",
                        read_manifest(mpath) if mpath is not None else None))
    return runs


def shared_manifest(runs: list[Run]) -> dict:
    """The one manifest all runs were split by; refused when they differ."""
    missing = [r.name for r in runs if r.manifest is None]
    if missing:
        raise UserError(f"run {missing[0]} has no splits.json; pass reference=FOLDER")
    first = runs[0]
    for r in runs[1:]:
        for s in SPLITS:
            if set(r.manifest[s]["groups"]) != set(first.manifest[s]["groups"]):
                raise UserError(
                    f"runs {first.name} and {r.name} were split differently ({s} groups "
                    "differ), so one may be tested on what it trained on; train them with one "
                    "split.manifest or pass reference=FOLDER")
    return first.manifest


def reference_files(cfg: DictConfig, runs: list[Run]) -> list[tuple[str, Path]]:
    """The reference pieces as (id, path): the runs' shared test (or val) split, or the MIDI
    files of `reference=FOLDER`."""
    if cfg.get("reference"):
        root = Path(str(cfg.reference)).expanduser()
        files = midi_files([root])
        if not files:
            raise UserError(f"reference {root} has no .mid/.midi files; pass a MIDI folder")
        ref = [(str(f.relative_to(root) if root.is_dir() else f.name), f) for f in files]
    else:
        manifest = shared_manifest(runs)
        split = str(cfg.get("split", "test"))
        if split not in ("val", "test"):
            raise UserError(f"split must be val or test, got '{split}'")
        ref = [(e["id"], Path(e["path"])) for e in manifest[split]["pieces"]]
        if not ref:
            raise UserError(f"the runs' manifest has no {split} pieces; pass reference=FOLDER")
    missing = [p for _, p in ref if not p.is_file()]
    if missing:
        raise UserError(f"reference piece {missing[0]} is missing; restore the data or pass "
                        "reference=FOLDER")
    ref = [(i, p) for i, p in sorted(ref) if _usable(p, "reference")]
    if not ref:
        raise UserError("no reference piece could be read; check the reference files")
    return ref


def training_files(runs: list[Run]) -> tuple[list[Path], dict]:
    """The copy check's training set: every piece the runs, and every checkpoint their
    weights learned from (an adapter's base, its base, an autoencoder), trained on, once (by
    content hash where the manifest records it, else by path), and what it covers: how many
    were listed, the files that are missing or unreadable (named), and the runs or ancestors
    whose training data is unknown (no manifest: released weights, say)."""
    seen: set[str] = set()
    files: list[Path] = []
    unknown: list[str] = []
    for run in runs:
        for name, manifest in lineage_manifests(run.ckpt):
            if manifest is None:
                unknown.append(name if name != str(run.ckpt) else run.name)
                continue
            for e in manifest["train"].get("pieces", []):
                key = e.get("sha") or str(Path(e["path"]).absolute())
                if key not in seen:
                    seen.add(key)
                    files.append(Path(e["path"]))
    unknown = list(dict.fromkeys(unknown))
    missing = [str(p) for p in files if not p.is_file()]
    unreadable = [str(p) for p in files if p.is_file() and not _usable(p, "training")]
    bad = {*missing, *unreadable}
    coverage = {"listed": len(files), "missing": missing, "unreadable": unreadable,
                "unknown_training_data": unknown}
    for what, paths in (("are missing", missing), ("cannot be read", unreadable)):
        if paths:
            print(f"compare: copy check: {len(paths)} of {len(files)} training files {what} "
                  f"and are left out (e.g. {paths[0]}); report.json names them",
                  file=sys.stderr)
    if unknown:
        print(f"compare: copy check: what {unknown[0]} trained on is not known (no "
              f"splits.json){f' nor {len(unknown) - 1} more' if len(unknown) > 1 else ''}; "
              "not indexed", file=sys.stderr)
    return [p for p in files if str(p) not in bad], coverage


def _usable(path: Path, what: str) -> bool:
    """A file every later step can read; one that is not is skipped with one line."""
    try:
        read_score(path)
        return True
    except BadMidi as e:
        print(f"compare: skipped {what} file {path}: {e}", file=sys.stderr)
        return False


def write_prompts(ref: list[tuple[str, Path]], cfg: DictConfig, out: Path) -> list[dict]:
    """The first `prompt_seconds` of each of the first K reference pieces: what every branch
    continues."""
    out.mkdir(parents=True, exist_ok=True)
    ps, k = float(cfg.prompt_seconds), int(cfg.max_prompts)
    prompts = []
    for pid, path in ref:
        if len(prompts) == k:
            break
        try:
            secs = read_score(path).to("second")
        except BadMidi as e:
            print(f"compare: no prompt from {path}: {e}", file=sys.stderr)
            continue
        excerpt = cut_prompt(secs, ps)  # as mehldau-generate cuts a prompt
        if excerpt.note_num() == 0:
            print(f"compare: no prompt from {path}: no notes in its first {ps:g} s",
                  file=sys.stderr)
            continue
        name = f"p{len(prompts):02d}"
        excerpt.to("tick").dump_midi(str(out / f"{name}.mid"))
        prompts.append({"name": name, "piece": pid, "source": str(path),
                        "path": str(out / f"{name}.mid")})
    if not prompts:
        raise UserError("no reference piece gave a prompt; check the reference files")
    return prompts


# --- running the branches ---------------------------------------------------------------
def run_worker(run: Run, cfg: DictConfig, prompts: list[dict], ref: list[tuple[str, Path]],
               work: Path, out_dir: Path) -> dict:
    job = {"name": run.name, "ckpt": str(run.ckpt), "branch": run.branch,
           "recipe": run.recipe, "prompts": prompts, "out_dir": str(out_dir),
           "seconds": float(cfg.seconds), "prompt_seconds": float(cfg.prompt_seconds),
           "samples_per_prompt": int(cfg.samples_per_prompt), "seed": int(cfg.seed),
           "sampling": {k: cfg[k] for k in ("temperature", "top_k", "top_p")},
           "device": str(cfg.device), "style": cfg.get("style"),
           "score_files": [[i, str(p)] for i, p in ref] if cfg.likelihood else []}
    work.mkdir(parents=True, exist_ok=True)
    job_path, result_path = work / f"{run.name}.job.json", work / f"{run.name}.result.json"
    job_path.write_text(json.dumps(job, indent=1))
    print(f"compare: {run.name} ({run.branch}): generating {len(prompts)} x "
          f"{cfg.samples_per_prompt} samples", file=sys.stderr)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[3]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "mehldau.evaluation.worker", str(job_path),
                           str(result_path)], env=env)
    if proc.returncode != 0 or not result_path.is_file():
        raise UserError(f"run {run.name} failed to generate (exit {proc.returncode}); its "
                        "error is above")
    return json.loads(result_path.read_text())


# --- measuring ---------------------------------------------------------------------------
def reference_items(ref: list[tuple[str, Path]], seconds: float) -> list[Item]:
    """Each reference piece cut into consecutive `seconds`-long segments (a piece shorter
    than that is one segment)."""
    items = []
    for pid, path in ref:
        notes = read_notes(path)
        n = max(1, int(notes.seconds // seconds))
        for k in range(n):
            seg = cut(notes, k * seconds, seconds)
            if len(seg):
                items.append(Item(f"ref:{pid}:{k}", pid, seg, str(path), start=k * seconds))
    return items


def generated_items(run: Run, result: dict, prompts: list[dict], start: float,
                    seconds: float) -> list[Item]:
    items = []
    for p in prompts:
        for k, f in enumerate(result["files"][p["name"]]):
            items.append(Item(f"{run.name}:{p['name']}:{k}", p["piece"],
                              cut(read_notes(f), start, seconds), f, start=start))
    return items


def human_items(ref: list[tuple[str, Path]], prompts: list[dict], per_prompt: int,
                prompt_seconds: float, seconds: float) -> list[Item]:
    """The pianist's own continuations, shaped as a branch's: for each prompt, the
    `seconds` that follow it in the real performance, then (for a branch's further samples)
    the next `seconds` of the same piece. Where a piece ends first: the same span after the
    cut of a reference piece no prompt came from (each used once); failing that, what is
    left of the piece if it is at least half a span, else the first continuation again.
    Each item stands in its prompt's group, so the intervals treat it as a branch's.

    Like a branch's continuations they are measured after the prompt, and never against the
    segments of the piece they come from (`Item.piece`, `pair_distances`)."""
    notes = {pid: read_notes(path) for pid, path in ref}
    paths = dict(ref)
    used = {p["piece"] for p in prompts}
    spare = [pid for pid, _ in ref if pid not in used
             and notes[pid].seconds >= prompt_seconds + seconds]
    items = []
    for p in prompts:
        pid = p["piece"]
        for k in range(per_prompt):
            src, start = pid, prompt_seconds + k * seconds
            if start + seconds > notes[pid].seconds:  # the piece ends within this span
                if spare:
                    src, start = spare.pop(0), prompt_seconds
                elif notes[pid].seconds - start < seconds / 2 or not len(
                        cut(notes[pid], start, seconds)):
                    start = prompt_seconds
            items.append(Item(f"human:{p['name']}:{k}", pid, cut(notes[src], start, seconds),
                              str(paths[src]), piece=src, start=start))
    return items


def floor_items(reference: list[Item], prompts: list[dict], per_prompt: int, seconds: float,
                seed: int) -> list[Item]:
    """Random notes as dense as the reference segments, shaped as a branch's samples (one
    group per prompt, `per_prompt` each)."""
    rng = np.random.default_rng(seed)
    density = np.mean([len(i.notes) for i in reference])
    return [Item(f"random:{p['name']}:{k}", p["piece"],
                 feat.random_notes(max(1, int(round(density))), seconds, rng))
            for p in prompts for k in range(per_prompt)]


def shuffled_items(human: list[Item], seed: int) -> list[Item]:
    """The human continuations with their pitches dealt at random among their notes (onsets,
    lengths and velocities kept), each in its prompt's group."""
    from mehldau.data.damaged_clips import shuffled_pitches

    out = []
    for k, it in enumerate(human):
        n = it.notes
        rows = shuffled_pitches(np.stack([n.onset, n.end, n.pitch, n.velocity], 1),
                                n.seconds, np.random.default_rng([seed, 4, k]))
        out.append(Item(it.uid.replace("human:", "shuffled:", 1), it.group,
                        Notes.from_arrays(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3],
                                          seconds=n.seconds), it.source, it.piece, it.start))
    return out


def pair_distances(a: list[tuple[int, np.ndarray]], b: list[tuple[int, np.ndarray]]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(intra, inter): the distances within b and from a to b of one feature, over (piece
    number, vector) pairs. No pair of one piece is a distance, on either side: two segments
    of one performance are closer than any two performances, and a continuation sits close
    to its own piece's segments, so a human continuation would otherwise be scored against
    its own source."""
    ua, xa = np.array([u for u, _ in a]), np.stack([v for _, v in a])
    ub, xb = np.array([u for u, _ in b]), np.stack([v for _, v in b])
    i, j = np.triu_indices(len(ub), 1)
    keep = ub[i] != ub[j]
    intra = np.linalg.norm(xb[i[keep]] - xb[j[keep]], axis=-1)
    inter = np.linalg.norm(xa[:, None] - xb[None], axis=-1)[ua[:, None] != ub[None]]
    return intra, inter


def _oa_kl(a: list[tuple[int, np.ndarray]], b: list[tuple[int, np.ndarray]]
           ) -> tuple[float, float]:
    """OA and KL of one feature (`pair_distances`)."""
    intra, inter = pair_distances(a, b)
    if len(intra) < 2 or len(inter) < 2:
        return math.nan, math.nan
    grid, p, q = dist.densities(intra, inter)
    return dist.overlap_area(p, q, grid), dist.kl_divergence(p, q, grid)


def _by_group(items: list[Item], value) -> list[list]:
    groups: dict[str, list] = {}
    for it in items:
        groups.setdefault(it.group, []).append(value(it))
    return list(groups.values())


def oa_kl_intervals(groups_a: list[list], groups_b: list[list], features: int
                    ) -> list[tuple[float, float, float]]:
    """OA and KL of each of `features` features, then their means, with jackknife intervals
    over groups (prompts; reference pieces), the same leave-outs for all, so the mean's
    interval is real; OA on the logit scale, KL on the log scale. Items are (piece number,
    [one vector per feature]); pairs of one piece are left out (`_oa_kl`)."""
    def stat(a, b):
        pairs = [_oa_kl([(u, v[k]) for u, v in a], [(u, v[k]) for u, v in b])
                 for k in range(features)]
        oa, kl = np.array(pairs).T
        if np.isnan(oa).all():  # too few pieces on a side (a leave-out of two)
            return [*oa, *kl, math.nan, math.nan]
        return [*oa, *kl, float(np.nanmean(oa)), float(np.nanmean(kl))]

    scales = ["logit"] * features + ["log"] * features + ["logit", "log"]
    return dist.jackknife_many(groups_a, groups_b, stat, scale=scales)


def feature_table(system: System, reference: list[Item]) -> dict:
    """Per feature, and averaged over features: OA and KL against the reference with their
    intervals (`oa_kl_intervals`)."""
    number = {pid: k for k, pid in enumerate(sorted({it.piece for it in
                                                     [*system.items, *reference]}))}
    names = list(FEATURES)

    def vectors(items):
        return _by_group(items, lambda it: (number[it.piece],
                                            [FEATURES[f](it.notes) for f in names]))

    values = oa_kl_intervals(vectors(system.items), vectors(reference), len(names))
    out = {f: {"oa": values[k], "kl": values[len(names) + k]} for k, f in enumerate(names)}
    out["mean"] = {"oa": values[-2], "kl": values[-1]}
    return out


def mean_with_interval(items: list[Item], value, scale: str = "log") -> tuple:
    return dist.group_mean(_by_group(items, value), scale=scale)


def summary_metrics(items: list[Item]) -> dict:
    cache = {it.uid: {**feat.muspy_metrics(it.notes), "notes_per_second":
                      len(it.notes) / max(it.notes.seconds, 1e-9),
                      "sliding_pitch_class_entropy": feat.sliding(it.notes)["pitch_class_entropy"]}
             for it in items}
    return {m: mean_with_interval(items, lambda it, m=m: float(cache[it.uid][m]),
                                  METRIC_SCALES.get(m, "log")) for m in SUMMARY_METRICS}


def copy_table(items: list[Item], index: TrainIndex | None, threshold: int, min_len: int
               ) -> dict:
    if index is None:
        return {}
    reports = [copy_report(it.notes, index, threshold) for it in items]
    shares = [index.copied_share(it.notes, min_len) for it in items]
    longest = [r["longest"] for r in reports]
    return {"longest_max": int(max(longest, default=0)),
            "longest_median": float(np.median(longest)) if longest else 0.0,
            "copied_share_mean": float(np.mean(shares)) if shares else 0.0,
            "flagged": int(sum(r["flagged"] for r in reports)), "samples": len(reports),
            "longest": longest,
            "flagged_files": [it.source for it, r in zip(items, reports) if r["flagged"]]}


def likelihood_table(result: dict) -> dict:
    pieces = [PieceScore(**p) for p in result.get("likelihood_pieces", [])]
    if not pieces:
        return {}
    summary = summarize(pieces)
    groups = [[p] for p in pieces]
    for key in ("nats_per_note", "bits_per_second"):
        summary[key] = dist.jackknife(groups, [], lambda x, _, key=key: summarize(x)[key],
                                      scale="log")
    summary["policy"] = POLICY
    return summary


# --- the command -------------------------------------------------------------------------
def compare(cfg: DictConfig) -> Path:
    from mehldau.evaluation import report

    runs = load_runs(list(cfg.runs))
    for key in ("seconds", "prompt_seconds", "samples_per_prompt", "max_prompts"):
        if cfg[key] is None or cfg[key] <= 0:
            raise UserError(f"{key} must be positive, got {cfg[key]}")
    out = Path(str(cfg.out)).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new out= directory")
    ref = reference_files(cfg, runs)
    seconds, seed = float(cfg.seconds), int(cfg.seed)
    ps, per_prompt = float(cfg.prompt_seconds), int(cfg.samples_per_prompt)
    reference = reference_items(ref, seconds)
    style_plan = None
    if (cfg.get("judge") or {}).get("run"):
        from mehldau.evaluation.style import open_judge

        # a bad judge.run or target, or an overlap of its data with the runs', is refused
        # before anything is generated
        style_plan = open_judge(cfg, runs, ref)
    if len({it.piece for it in reference}) < 2:
        raise UserError(f"the reference has {len(ref)} usable piece; distances are measured "
                        "between pieces, so pass at least two (more reference pieces, or "
                        "reference=FOLDER)")
    with atomic_dir(out) as tmp:
        prompts = write_prompts(ref, cfg, tmp / "prompts")
        results = {}
        for run in runs:
            results[run.name] = run_worker(run, cfg, prompts, ref, tmp / "work",
                                           tmp / "midi" / run.name)
        systems = []
        for run in runs:
            systems.append(System(run.name, generated_items(run, results[run.name], prompts,
                                                            ps, seconds),
                                  extra={"branch": run.branch, "run": str(run.path),
                                         "checkpoint": str(run.ckpt),
                                         "result": results[run.name]}))
        # Two rows measured exactly as a branch's: the same prompts, item count, length,
        # reference and intervals.
        human = System("human", human_items(ref, prompts, per_prompt, ps, seconds), "ceiling")
        floor = System("random notes", floor_items(reference, prompts, per_prompt, seconds,
                                                   seed), "floor")
        anchor = System("shuffled pitches", shuffled_items(human.items, seed), "floor")
        repeated = len(human.items) - len({(it.source, it.start) for it in human.items})
        if repeated:
            print(f"compare: the human row repeats {repeated} continuations: the reference "
                  f"pieces are too short for {per_prompt} spans of {seconds:g} s after each "
                  "prompt", file=sys.stderr)
        index, coverage = None, {}
        if cfg.copy_check:
            train_files, coverage = training_files(runs)
            train_notes = [read_notes(p) for p in train_files]
            index = TrainIndex(train_notes) if train_files else None
            coverage.update(indexed_pieces=len(train_files),
                            indexed_notes=int(sum(len(n) for n in train_notes)))
            print(f"compare: copy check indexed {len(train_files)} training pieces "
                  f"({coverage['indexed_notes']:,} notes) of {coverage['listed']} listed",
                  file=sys.stderr)
        table = {}
        for s in [*systems, human, floor, anchor]:
            print(f"compare: measuring {s.name}", file=sys.stderr)
            table[s.name] = {
                "kind": s.kind, "items": len(s.items),
                "features": feature_table(s, reference),
                "metrics": summary_metrics(s.items),
                "copy": copy_table(s.items, index, int(cfg.copy_threshold),
                                   int(cfg.copy_min_len)),
                "likelihood": likelihood_table(s.extra.get("result", {})),
                **{k: v for k, v in s.extra.items() if k != "result"}}
            if s.kind == "branch":
                r = s.extra["result"]
                music = len(s.items) * seconds
                table[s.name]["cost"] = {
                    "compute_seconds_per_music_minute": r["generate_seconds"] / music * 60,
                    "peak_rss_mb": r["peak_rss_mb"], "peak_cuda_mb": r.get("peak_cuda_mb")}
        style = None
        if style_plan is not None:
            from mehldau.evaluation.style import style_section

            rows, style = style_section(cfg, style_plan, systems, human, [floor, anchor],
                                        len(human.items), seconds, seed)
            for name, row in rows.items():
                table.setdefault(name, {"kind": "floor", "style_only": True,
                                        "items": row["clips"]})["style"] = row
        table["human"]["excerpts"] = [{"prompt": it.uid.split(":")[1], "source": it.source,
                                       "start": it.start} for it in human.items]
        table["reference"] = {"kind": "reference", "items": len(reference),
                              "metrics": summary_metrics(reference),
                              "copy": copy_table(reference, index, int(cfg.copy_threshold),
                                                 int(cfg.copy_min_len))}
        report.write_all(tmp, cfg, table, systems, reference, prompts, ref, out,
                         copy_coverage=coverage, baselines=[human, floor, anchor],
                         style=style)
        shutil.rmtree(tmp / "work")  # the jobs' results are in report.json
    print(f"compare: wrote {out / 'report.md'}", file=sys.stderr)
    return out
