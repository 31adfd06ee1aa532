"""What `mehldau-compare` writes: report.md, report.json, metrics.csv, plots, audio and a
blind listening kit. The numbers are computed in `compare`; this module only lays them out.

Audio goes through the FluidSynth command-line synthesizer with a General MIDI soundfont
(Debian: `fluidsynth`, `fluid-soundfont-gm`); without them the renders are skipped with one
line, never the report.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mehldau.evaluation import listening
from mehldau.evaluation.features import FEATURES, read_notes

SOUNDFONTS = ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/sounds/sf2/default-GM.sf2")


def _ci(v, fmt: str = "{:.3f}") -> str:
    from mehldau.evaluation.judge_report import ci

    return ci(v, fmt) if v else "n/a"


def check_intervals(tree, where: str = "report") -> None:
    """Every (value, lo, hi) tuple in `tree` (how the interval functions return them) holds
    its value; a violation is a bug in how an interval was made, and stops the report
    rather than print a figure outside its own interval."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            check_intervals(v, f"{where}.{k}")
    elif isinstance(tree, tuple) and len(tree) == 3 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in tree):
        v, lo, hi = map(float, tree)
        if not any(math.isnan(x) for x in (v, lo, hi)) and not lo - 1e-9 <= v <= hi + 1e-9:
            raise RuntimeError(f"{where}: {v} is outside its interval [{lo}, {hi}]")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            check_intervals(v, f"{where}[{i}]")


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# --- tables ---------------------------------------------------------------------------------
COLUMNS = [  # (header, getter, how "best" is decided, format)
    ("mean OA ↑", lambda r: r.get("features", {}).get("mean", {}).get("oa"), "max", "{:.3f}"),
    ("mean KL ↓", lambda r: r.get("features", {}).get("mean", {}).get("kl"), "min", "{:.3f}"),
    ("nats/note ↓", lambda r: r.get("likelihood", {}).get("nats_per_note"), "min", "{:.3f}"),
    ("bits/s ↓", lambda r: r.get("likelihood", {}).get("bits_per_second"), "min", "{:.1f}"),
    ("notes/s", lambda r: r["metrics"]["notes_per_second"], "near", "{:.2f}"),
    ("polyphony", lambda r: r["metrics"]["polyphony"], "near", "{:.2f}"),
    ("PC entropy", lambda r: r["metrics"]["pitch_class_entropy"], "near", "{:.2f}"),
    ("scale cons.", lambda r: r["metrics"]["scale_consistency"], "near", "{:.3f}"),
]


def _value(row: dict, get):
    try:
        v = get(row)
    except (KeyError, TypeError):
        return None
    return v


def main_table(table: dict) -> list[str]:
    names = [n for n in table if not table[n].get("style_only")]
    branches = [n for n in names if table[n]["kind"] == "branch"]
    ref = table.get("reference", {})
    best: dict[str, str] = {}
    for header, get, rule, _ in COLUMNS:
        vals = {n: _value(table[n], get) for n in branches}
        vals = {n: v[0] for n, v in vals.items() if v and not math.isnan(v[0])}
        if not vals:
            continue
        if rule == "max":
            best[header] = max(vals, key=vals.get)
        elif rule == "min":
            best[header] = min(vals, key=vals.get)
        else:
            target = _value(ref, get)
            if target:
                best[header] = min(vals, key=lambda n: abs(vals[n] - target[0]))
    heads = [h for h, *_ in COLUMNS] + ["longest copy", "flagged", "s / music-min",
                                        "peak MB"]
    lines = ["| system | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for n in names:
        row = table[n]
        cells = []
        for header, get, _, fmt in COLUMNS:
            v = _value(row, get)
            text = _ci(v, fmt) if v else "n/a"
            cells.append(f"**{text}**" if best.get(header) == n else text)
        cp = row.get("copy") or {}
        cells.append(f"{cp['longest_max']} (median {cp['longest_median']:.0f})" if cp
                     else "n/a")
        cells.append(f"{cp['flagged']}/{cp['samples']}" if cp else "n/a")
        cost = row.get("cost") or {}
        cells.append(f"{cost['compute_seconds_per_music_minute']:.1f}" if cost else "n/a")
        mem = cost.get("peak_cuda_mb") or cost.get("peak_rss_mb")
        cells.append(f"{mem:.0f}" if mem else "n/a")
        label = n if row["kind"] == "branch" else f"*{n}*"
        if row.get("branch"):
            label += f" ({row['branch']})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


STYLE_COLUMNS = [  # (header, key, format); the key's value is (value, lo, hi) or None
    ("attributed to target ↑", "target_share", "{:.2f}"),
    ("unlike any pianist", "unlike_any_pianist", "{:.2f}"),
    ("passes the gate", "gate_pass", "{:.2f}"),
    ("mean P(target) ↑", "target_probability", "{:.2f}"),
    ("windows attributed ↑", "window_share", "{:.2f}"),
    ("normalised ↑", "normalised", "{:.2f}"),
    ("kernel distance ↓", "kernel", "{:.3g}"),
]


def judge_line(style: dict) -> str:
    """The judge run, its test accuracy, calibration and rejection: said beside every style
    figure."""
    test = style.get("judge_test") or {}
    acc, clip = test.get("piece_accuracy"), test.get("clip_accuracy")
    if not acc:
        return (f"judge `{style['judge_run']}` ({len(style['classes'])} classes; no "
                "judge_report.json: its test figures are unknown)")
    said = f"test accuracy {_ci(acc)} per piece, {_ci(clip)} per clip, on {test.get('pieces')}"
    said += " held-out pieces"
    cal = test.get("calibration") or {}
    if cal:
        said += (f"; temperature {cal['temperature']:.2f}, calibration error "
                 f"{cal['before']['ece']:.3f} → {cal['after']['ece']:.3f}")
        floor = cal["after"].get("calibrated_floor")
        if floor:
            said += (f" (a perfectly calibrated judge: {floor[0]:.3f}, {floor[1]:.3f}–"
                     f"{floor[2]:.3f}, at its {cal['test_clips']} clips)")
    lofo = test.get("leave_one_out") or {}
    if lofo:
        worst = min(lofo, key=lambda f: lofo[f]["auroc"][0])
        said += (f"; a damage family it never saw rejected with AUROC ≥ "
                 f"{lofo[worst]['auroc'][0]:.3f} ({worst})")
    return (f"judge `{style['judge_run']}` ({len(style['classes'])} classes with "
            f"*{style.get('abstain')}*, trained on {style['judge_clip_seconds']:g} s clips; "
            f"{said})")


def _distance_cell(row: dict, key: str) -> str:
    base = (row.get("baseline") or {}).get(key)
    v = row.get(key)
    if v is None:
        return "n/a"
    text = _ci(v, "{:.3g}") if isinstance(v, (list, tuple)) else f"{v:.3g}"
    n = row["clips"]
    if base and not math.isnan(base[0]):
        text += f" (n={n}; the pianist's own at n={n}: {base[0]:.3g} [{base[1]:.3g}, " \
                f"{base[2]:.3g}])"
    return text


def style_rows(table: dict, style: dict) -> list[str]:
    heads = [h for h, _, _ in STYLE_COLUMNS] + ["Fréchet (judge space) ↓", "most attributed to"]
    lines = [f"Target: **{style['target']}**; {judge_line(style)}.", "",
             "| system | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for n, row in table.items():
        st = row.get("style")
        if not st:
            continue
        cells = []
        for _, key, fmt in STYLE_COLUMNS:
            v = st.get(key)
            if key == "kernel":
                cells.append(_distance_cell(st, "kernel"))
            elif key == "normalised" and v is None:
                cells.append("n/a (see below)" if style.get("normalised_reason") else "n/a")
            else:
                cells.append(_ci(v, fmt) if v else "n/a")
        cells.append(_distance_cell(st, "frechet"))
        cells.append(", ".join(f"{c} {k}" for c, k in st.get("attributed_to", {}).items()))
        label = n if row["kind"] == "branch" else f"*{n}*"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if style.get("normalised_reason"):
        lines += ["", f"normalised: n/a because {style['normalised_reason']}."]
    else:
        lines += ["", f"normalised: the floor is *{style.get('floor')}*, the higher floor."]
    gate = style.get("gate")
    if gate:
        lines += ["", f"Gate: a clip counts for {style['target']} only if its mean cosine "
                  f"distance to its {gate['k']} nearest {style['target']} val clips "
                  f"({gate['reference_clips']}, cut as these rows are) is at most "
                  f"{gate['threshold']:.4f}, the distance that best tells {style['target']}'s "
                  f"val clips ({gate['val_own_pass']:.0%} pass) from the other pianists' "
                  f"({(gate['val_other_pass'] or 0):.0%} of {gate['val_other_clips']} pass)."]
    return lines


STYLE_HOW_TO_READ = """\
How to read it. A style judge (a piano-roll ResNet trained to name the pianist of a clip,
`mehldau-train branch=style_judge`) listens to every excerpt above, cut by the same rule as
every other figure here (the notes that start in the `seconds` after the prompt). It can
say that an excerpt is no pianist's: besides the pianists it has a class *unlike any
pianist*, trained on real clips damaged in seven ways (random notes, shuffled pitches,
shuffled onsets, quantized at one velocity, held clusters, one voice, soft and sparse);
its report says how it rejects a kind of damage it never trained on. **attributed to
target** is the share of excerpts whose most likely class is the target *and* that pass the
**gate**: their embedding lies as close to the target's held-out (val) clips as the target's
own clips lie to each other. **unlike any pianist** is the share given to the abstain class.
**mean P(target)** is its temperature-calibrated probability, **windows attributed** the
share of shorter windows sliding along each excerpt it gives to the target (argmax alone;
Edwards et al. 2026 score continuations this way). The *human* row is the ceiling: the
target pianist's own continuations of the same prompts. Three floors: *random notes*,
*shuffled pitches* (the pianist's continuations with pitches dealt among their notes), and
*other pianists*, as many clips of the other pianists' test pieces, cut the same way.
**normalised** = (row − floor) / (ceiling − floor), clipped to [0, 1], the floor being the
higher of *other pianists* and *random notes*; n/a, with the reason, where the ceiling's and
the floor's intervals overlap. **kernel distance** is KID's unbiased MMD² between the
excerpts' embeddings (the judge's penultimate layer) and the target's val clips (pairs
within one prompt or one piece left out), with beside it what the target's own test clips
score at the same n (median and central 95 % of draws): a row is near the pianist when it sits
inside that range. **Fréchet** is shown only with its n and the same baseline: at these
sizes it is mostly bias (two sets drawn from one 64-d standard normal give ~120 at
n = 6, ~44 at n = 50).
Shares carry Wilson intervals at the effective sample size over prompts (a floor's: its
pieces); the rest delete-one-prompt jackknife intervals. Guard rails, checked by content
hash before any figure: no reference piece (prompts, human ceiling) is in the judge's
training split, and no held-out piece of the floor or of the distance reference is in any
compared run's training split. The judge only measures: nothing here chose or stopped any
run's training."""


def plot_style(table: dict, path: Path, style: dict) -> None:
    plt = _plt()
    rows = [(n, r["style"]) for n, r in table.items() if r.get("style")]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4))
    for k, (n, st) in enumerate(rows):
        for dx, key, colour in ((-0.2, "target_share", "C0"), (0.2, "unlike_any_pianist",
                                                                 "C3")):
            v, lo, hi = st[key]
            ax.bar(k + dx, v, 0.38, color=colour if table[n]["kind"] == "branch" else
                   {"C0": "0.45", "C3": "0.75"}[colour],
                   label=None if k else {"C0": f"attributed to {style['target']}",
                                         "C3": "unlike any pianist"}[colour])
            if not math.isnan(lo):
                ax.vlines(k + dx, lo, hi, color="k", lw=1)
    ax.set_xticks(range(len(rows)), [n for n, _ in rows], rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of excerpts")
    ax.legend(fontsize=8)
    test = (style.get("judge_test") or {}).get("piece_accuracy")
    acc = f", judge test accuracy {test[0]:.2f} per piece" if test else ""
    ax.set_title(f"Style: whose music the judge hears{acc} (grey: ceiling and floors)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def feature_rows(table: dict) -> list[str]:
    names = [n for n in table if "features" in table[n]]
    feats = list(FEATURES)
    lines = ["| OA per feature | " + " | ".join(feats) + " |", "|---" * (len(feats) + 1) + "|"]
    for n in names:
        cells = [_ci(table[n]["features"][f]["oa"], "{:.2f}") for f in feats]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines


HOW_TO_READ = """\
How to read it. Every row is measured the same way: for each prompt, `samples_per_prompt`
excerpts of `seconds`, after the prompt, against the same reference segments, with intervals
from the same resampling of prompts. **OA** (overlap area, mgeval's method on one shared grid)
compares, feature by feature, how far the excerpts sit from the reference segments with how
far the reference segments sit from each other: 1 = indistinguishable from the reference's own
spread. Distances are only taken between different pieces (never an excerpt against a
segment of the piece it comes from or continues, never two segments of one piece), so a
human continuation is not scored against its own source. The *human* row is the pianist's own
continuations of the same prompts: the `seconds` after each cut, then the following
`seconds` of the same piece for each further sample (another reference piece where one
ends too soon; report.json lists every excerpt): what real music scores under exactly this
protocol and sample size, the ceiling a branch is read against. *random notes* is the floor:
as many excerpts of random notes as dense as the reference; *shuffled pitches* is the
pianist's own continuations with their pitches dealt at random among their notes (rhythm,
touch and density kept: what is left is harmony and melody). **KL** is the divergence of the
reference's own distances from the excerpt-to-reference ones (0 best). **nats/note** and
**bits/s** are the test split's likelihood under each model, on one context policy (below),
divided by the file's notes and seconds, so a verbose tokenization cannot win ("n/a" for the
diffusion branch, which has no likelihood). notes/s, polyphony, pitch-class entropy and scale
consistency (MusPy's definitions, on a 10 ms grid) are means per excerpt; the best of those
is the branch nearest the *reference* row (every segment of the reference pieces; the 15 s
sliding pitch-class entropy in report.json is one window when `seconds` is shorter). **Copy
check**: the longest run of notes (transposition-invariant pitch intervals and inter-onset
times) an excerpt shares with the indexed training pieces, and how many excerpts pass the
flag threshold; the *human* row is the baseline on equal terms (real music shares short runs
too). OA rewards copies; the copy check is its counterweight. Brackets are 95 % intervals
from the delete-one-prompt jackknife (the reference: one piece left out at a time; OA on
the logit scale, KL on the log scale): a resample never repeats a prompt, which would pull
OA down, and every interval holds its estimate. Two rows whose intervals overlap are not
called different. Bold marks the best branch per column. Beat-grid metrics are not
reported: transcribed performances have no reliable beat grid."""


def coverage_line(coverage: dict, cfg: DictConfig) -> str:
    """What the copy check indexed, and what it could not."""
    if not cfg.copy_check:
        return "Copy check: off (copy_check=false)."
    if not coverage:
        return "Copy check: no training pieces known (no run has a splits.json)."
    line = (f"Copy check: indexed {coverage['indexed_pieces']} training pieces "
            f"({coverage['indexed_notes']:,} notes) of the {coverage['listed']} that the runs' "
            "manifests and their bases' list as trained on")
    gaps = [f"{len(coverage[k])} {what}" for k, what in (
        ("missing", "missing"), ("unreadable", "unreadable")) if coverage.get(k)]
    if gaps:
        line += f"; left out: {', '.join(gaps)} (named in report.json)"
    if coverage.get("unknown_training_data"):
        line += (f"; not covered: what {', '.join(coverage['unknown_training_data'])} trained "
                 "on (no splits.json)")
    return line + "."


# --- plots ----------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_oa(table: dict, path: Path) -> None:
    plt = _plt()
    names = [n for n in table if "features" in table[n]]
    feats = list(FEATURES)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    w = 0.8 / max(len(names), 1)
    for k, n in enumerate(names):
        v = np.array([table[n]["features"][f]["oa"] for f in feats], float)
        x = np.arange(len(feats)) + k * w
        ax.bar(x, v[:, 0], w, label=n)
        ax.vlines(x, v[:, 1], v[:, 2], color="k", lw=0.7)
    ax.set_xticks(np.arange(len(feats)) + 0.4 - w / 2, feats, rotation=30, ha="right")
    ax.set_ylabel("overlap area (OA)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncol=3)
    ax.set_title("OA per feature vs the reference (95 % jackknife intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kde(systems, reference, path: Path) -> None:
    """Per feature: the reference's intra-set distances and each system's inter-set ones,
    pairs of one piece left out as in the table (`compare.pair_distances`)."""
    from mehldau.evaluation import distribution as dist
    from mehldau.evaluation.compare import pair_distances

    plt = _plt()
    feats = list(FEATURES)
    number = {pid: k for k, pid in enumerate(sorted({it.piece for s in [*systems, reference]
                                                     for it in getattr(s, "items", s)}))}
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(feats) / cols), cols, figsize=(16, 10))
    for ax, f in zip(axes.flat, feats):
        b = [(number[it.piece], FEATURES[f](it.notes)) for it in reference]
        intra = None
        for s in systems:
            a = [(number[it.piece], FEATURES[f](it.notes)) for it in s.items]
            intra, inter = pair_distances(a, b)
            if len(intra) and len(inter):
                grid, _, q = dist.densities(intra, inter)
                ax.plot(grid, q, lw=1, label=s.name)
        if intra is not None and len(intra):
            grid, p, _ = dist.densities(intra, intra)
            ax.plot(grid, p, "k--", lw=1.5, label="reference (intra)")
        ax.set_title(f, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(feats):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Distance densities: reference to itself (dashed) vs each system to it "
                 "(pairs within one piece left out)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_rolls(prompt: dict, files: dict[str, str], seconds: float, starts: dict[str, float],
               path: Path) -> None:
    """The same prompt's continuation by each system, and the pianist's, as piano rolls."""
    plt = _plt()
    fig, axes = plt.subplots(len(files), 1, figsize=(12, 2.2 * len(files)), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, (name, f) in zip(axes, files.items()):
        n = read_notes(f)
        start = starts.get(name, 0.0)
        for on, end, pitch in zip(n.onset, n.end, n.pitch):
            if on >= start + seconds:
                continue
            colour = "0.6" if on < start else "C0"
            ax.add_patch(plt.Rectangle((on - start, pitch - 0.4), end - on, 0.8, color=colour))
        ax.set_xlim(-max(starts.values(), default=0.0), seconds)
        ax.set_ylim(20, 109)
        ax.set_ylabel(name, fontsize=8)
    axes[-1].set_xlabel("seconds after the prompt (grey: the prompt)")
    fig.suptitle(f"prompt {prompt['name']}: {prompt['piece']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_copies(table: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    rows = {n: r["copy"]["longest"] for n, r in table.items() if r.get("copy")}
    if rows:
        top = max(max(v, default=1) for v in rows.values())
        bins = np.arange(0, top + 2) - 0.5
        for n, v in rows.items():
            ax.hist(v, bins=bins, histtype="step", lw=1.5, label=n, density=True)
        ax.legend(fontsize=8)
    ax.set_xlabel("longest run shared with the training split (notes)")
    ax.set_ylabel("share of samples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- audio ----------------------------------------------------------------------------------
def soundfont(cfg: DictConfig) -> Path | None:
    given = cfg.get("soundfont")
    for cand in ([given] if given else SOUNDFONTS):
        if cand and Path(str(cand)).expanduser().is_file():
            return Path(str(cand)).expanduser()
    return None


def excerpt_midi(src: str | Path, start: float, seconds: float, dst: Path) -> None:
    """The notes of `src` starting in [start, start + seconds), moved to start at 0, read as
    the note statistics read them (`features.read_notes`: sustain pedal folded into note ends,
    the window cut by `features.cut`) and written with no pedal events (`listening.notes_midi`):
    every clip of a blind trial goes through here, the pianist's and the branches' alike, as
    a clip that kept its pedal could render differently from one with it folded in."""
    listening.notes_midi(read_notes(src, start, seconds), dst)


# Every blind-test clip is cut to what was asked plus this much release (a 30 ms fade, no
# click): held notes and pedal otherwise make one system's clips seconds longer than
# another's, and a listener could tell them apart by length alone.
LISTEN_TAIL = 1.0


def render(midi: str | Path, wav: Path, font: Path, seconds: float | None = None) -> bool:
    """MIDI -> 44.1 kHz WAV through FluidSynth, written whole or not at all. `seconds`: cut
    the render there (or pad it with silence) so clips meant to be alike are."""
    wav = Path(wav)
    wav.parent.mkdir(parents=True, exist_ok=True)
    tmp = wav.with_name(f".{wav.stem}.tmp.wav")
    # gain 1.0 instead of FluidSynth's 0.2: renders of soft playing were near -55 dBFS
    proc = subprocess.run(["fluidsynth", "-ni", "-q", "-g", "1.0", "-F", str(tmp), "-r",
                           "44100", str(font), str(midi)], capture_output=True, timeout=300)
    ok = proc.returncode == 0 and tmp.is_file()
    if ok and seconds is not None:
        fit_wav(tmp, float(seconds))
    if ok:
        os.replace(tmp, wav)
    else:
        tmp.unlink(missing_ok=True)
    return ok


def fit_wav(path: Path, seconds: float) -> None:
    """Cut a 16-bit WAV to `seconds` with a 30 ms fade, or pad it with silence."""
    import wave

    with wave.open(str(path)) as w:
        params = w.getparams()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    x = x.reshape(-1, params.nchannels).astype(np.float64)
    n = int(round(seconds * params.framerate))
    if len(x) > n:
        x = x[:n]
        fade = min(len(x), int(0.03 * params.framerate))
        x[len(x) - fade:] *= np.linspace(1.0, 0.0, fade)[:, None]
    else:
        x = np.concatenate([x, np.zeros((n - len(x), params.nchannels))])
    with wave.open(str(path), "wb") as w:
        w.setparams(params)
        w.writeframes(np.round(x).astype(np.int16).tobytes())


def write_listening_kit(out: Path, clips: list[tuple[str, str, Path]], seed: int) -> None:
    """The renders under shuffled names and an answer key, for blind A/B tests."""
    kit = out / "listening"
    kit.mkdir(parents=True, exist_ok=True)
    order = list(range(len(clips)))
    random.Random(seed).shuffle(order)
    key = {}
    for k, i in enumerate(order):
        system, prompt, wav = clips[i]
        name = f"clip_{k + 1:03d}{wav.suffix}"
        shutil.copyfile(wav, kit / name)
        key[name] = {"system": system, "prompt": prompt}
    (kit / "answer_key.json").write_text(json.dumps(key, indent=1))
    (kit / "README.txt").write_text(
        "Blind listening: play the clips in any order and note which you think are human or "
        "which you prefer; answer_key.json says what each one is. Each clip is the measured "
        "continuation of one prompt (the prompt itself cut off) by a model or by the "
        "pianist.\n")


# --- everything -----------------------------------------------------------------------------
def write_all(out: Path, cfg: DictConfig, table: dict, systems, reference, prompts: list[dict],
              ref: list, final: Path | None = None, copy_coverage: dict | None = None,
              baselines=(), style: dict | None = None) -> None:
    """Everything into `out`, a temp directory that becomes `final`: paths written in the
    report name `final`. `systems`: the branches; `baselines`: the human and floor rows."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_oa(table, plots / "oa_per_feature.png")
    plot_kde([*systems, *baselines], reference, plots / "kde.png")
    plot_copies(table, plots / "copy_lengths.png")
    if style is not None:
        plot_style(table, plots / "style.png", style)
    first = prompts[0]
    # every branch continues the prompt: its continuation starts where the prompt is cut
    starts = {name: float(cfg.prompt_seconds) for name in [*(s.name for s in systems),
                                                           "pianist"]}
    roll_files = {s.name: s.extra["result"]["files"][first["name"]][0] for s in systems}
    roll_files["pianist"] = first["source"]
    plot_rolls(first, roll_files, float(cfg.seconds), starts,
               plots / f"pianoroll_{first['name']}.png")

    font = soundfont(cfg) if cfg.audio else None
    audio_note = None
    if cfg.audio and (font is None or shutil.which("fluidsynth") is None):
        audio_note = ("audio skipped: needs the fluidsynth command and a General MIDI soundfont "
                      "(Debian: apt-get install fluidsynth fluid-soundfont-gm, or soundfont=FILE)")
        print(f"compare: {audio_note}", file=sys.stderr)
    elif cfg.audio:
        # Every clip is what was measured: `seconds` of continuation, prompt cut off, so a
        # blind listener cannot tell the systems apart by length or by a shared opening.
        clips = []
        ps = float(cfg.prompt_seconds)
        sources = [(s.name, p["name"], s.extra["result"]["files"][p["name"]][0], ps)
                   for s in systems for p in prompts]
        sources += [("pianist", p["name"], p["source"], ps) for p in prompts]
        for system, prompt, midi, start in sources:
            mid = out / "audio" / system / f"{prompt}.mid"
            excerpt_midi(midi, start, float(cfg.seconds), mid)
            if render(mid, mid.with_suffix(".wav"), font, float(cfg.seconds) + LISTEN_TAIL):
                clips.append((system, prompt, mid.with_suffix(".wav")))
        write_listening_kit(out, clips, int(cfg.seed))
        # for `mehldau-listen`: each prompt as heard before its continuations, and a weak
        # anchor (the pianist's excerpt, pitches shuffled) to screen listeners with
        listening.write_listening_audio(out, prompts, ps, float(cfg.seconds), int(cfg.seed),
                                        font)

    config = OmegaConf.to_container(cfg, resolve=True)
    check_intervals(table, "table")
    if style is not None:
        check_intervals(style, "style")
    report = {"config": config, "git_revision": _git_revision(), "seed": int(cfg.seed),
              "sampling": {k: config[k] for k in ("temperature", "top_k", "top_p")},
              "prompts": prompts, "reference_pieces": [str(p) for _, p in ref],
              "reference_segments": len(reference), "copy_coverage": copy_coverage or {},
              "table": table, "style": style}
    def moved(text: str) -> str:
        return text.replace(str(out), str(final)) if final is not None else text

    (out / "report.json").write_text(moved(json.dumps(report, indent=1, default=float)))
    write_csv(out / "metrics.csv", table, style)
    (out / "report.md").write_text(moved(markdown(cfg, table, prompts, ref, reference,
                                                  audio_note, copy_coverage or {}, style)))


def write_csv(path: Path, table: dict, style: dict | None = None) -> None:
    """One row per figure; style rows name the judge and its test accuracy (`judge`)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "kind", "group", "name", "stat", "value", "lo", "hi", "judge"])
        for name, row in table.items():
            for feat, d in row.get("features", {}).items():
                for stat, v in d.items():
                    w.writerow([name, row["kind"], "feature", feat, stat, *v])
            for m, v in row.get("metrics", {}).items():
                w.writerow([name, row["kind"], "metric", m, "mean", *v])
            for k, v in (row.get("likelihood") or {}).items():
                if isinstance(v, (list, tuple)):
                    w.writerow([name, row["kind"], "likelihood", k, "pooled", *v])
            for k, v in (row.get("copy") or {}).items():
                if isinstance(v, (int, float)):
                    w.writerow([name, row["kind"], "copy", k, "value", v, "", ""])
            for k, v in (row.get("cost") or {}).items():
                if v is not None:
                    w.writerow([name, row["kind"], "cost", k, "value", v, "", ""])
            for _, k, _ in STYLE_COLUMNS if style is not None and row.get("style") else ():
                v = row["style"].get(k)
                if v is None:
                    continue
                v = list(v) if isinstance(v, (list, tuple)) else [v, "", ""]
                w.writerow([name, row["kind"], "style", k, style["target"], *v,
                            judge_line(style)])


def markdown(cfg: DictConfig, table: dict, prompts: list[dict], ref: list, reference,
             audio_note: str | None, copy_coverage: dict | None = None,
             style: dict | None = None) -> str:
    from mehldau.evaluation.likelihood import POLICY

    runs = [f"`{n}` ({r['branch']}: {r['checkpoint']})" for n, r in table.items()
            if r["kind"] == "branch"]
    source = (f"`{cfg.reference}`" if cfg.get("reference")
              else f"the {cfg.split} split of the runs' shared manifest")
    lines = [
        "# mehldau-compare report", "",
        f"Runs: {', '.join(runs)}.", "",
        f"Reference: {len(ref)} pieces ({source}), "
        f"cut into {len(reference)} segments of {float(cfg.seconds):g} s. Prompts: the first "
        f"{float(cfg.prompt_seconds):g} s of {len(prompts)} of them; "
        f"{int(cfg.samples_per_prompt)} samples of {float(cfg.seconds):g} s per prompt and "
        f"branch, each continuing the prompt. Sampling: "
        f"temperature {cfg.temperature}, top_k {cfg.top_k}, top_p {cfg.top_p}, seed {cfg.seed}. "
        "Intervals: 95 %, over prompts (see below).", "",
        *main_table(table), "",
        *feature_rows(table), "",
        HOW_TO_READ, "",
        coverage_line(copy_coverage or {}, cfg), "",
        f"Likelihood context policy: {POLICY}.", "",
        *(["## Style: does it sound like the pianist?", "", *style_rows(table, style), "",
           STYLE_HOW_TO_READ, "", "![style](plots/style.png)", ""] if style else []),
        "Files: `report.json` (every value with its interval, the config, seeds, git revision), "
        "`metrics.csv`, `plots/` (OA per feature, distance densities, the first prompt's "
        "continuations as piano rolls, copy lengths), `midi/`, `prompts/`"
        + (", `audio/` (each system's renders, and `prompt/` and a shuffled-pitch `anchor/` "
           "for `mehldau-listen`) and `listening/` (shuffled renders + answer key)."
           if not audio_note
           and cfg.audio else "."),
    ]
    flagged = [(n, f) for n, r in table.items() for f in (r.get("copy") or {}).get(
        "flagged_files", [])]
    if flagged:
        lines += ["", f"Flagged by the copy check (≥ {cfg.copy_threshold} notes shared with "
                  "the training split):", *[f"- {n}: `{f}`" for n, f in flagged[:20]]]
    if audio_note:
        lines += ["", audio_note]
    return "\n".join(lines) + "\n"
