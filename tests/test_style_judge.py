"""The style judge: its parts (note lists, clips, the figures it reports), and the judge trained
end to end like every branch: on a PiJAMA-shaped tree (classes by the minutes rule, album
splits as the generators'), under the memory plan, through a kill and a resume, and on bad
input; on synthetic pianists, a judge that can say "no pianist" (rejection of damage it
never saw, calibration, the gate) and the comparison's style table it writes."""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import symusic
from conftest import scale_notes, write_midi
from test_data import write_pijama_csv
from test_resume import child, records

from mehldau.cli.compare import main as compare
from mehldau.cli.generate import main as generate
from mehldau.cli.train import main as train
from mehldau.data.clips import ClipAugmentation, ClipDataset, ClipWindows, clip_starts, render_clip
from mehldau.data.sources import pijama_source
from mehldau.evaluation.style import roc_auc
from mehldau.tokenize import build_tokenizer
from mehldau.train.checkpoint import latest_checkpoint

# A judge small enough for a few CPU steps: 5 s clips at 10 frames/s.
TINY = ["branch=style_judge", "model=judge_tiny", "model.layers=[1,1]", "model.widths=[8,16]",
        "model.stem_width=8", "judge.seconds=5", "judge.fps=10",
        "judge.abstain.leave_one_out=false",
        "train.batch_size=4", "train.eval_batch_size=8", "train.warmup_steps=1",
        "train.log_every=1", "train.eval_every=2", "train.ckpt_every=2", "train.keep_last=0",
        "logger=none"]


# --- parts -----------------------------------------------------------------------------------
def test_note_list_round_trips_and_folds_the_pedal(tmp_path: Path) -> None:
    notes = [(60, 0.5, 0.25, 80), (64, 1.0, 0.5, 90), (20, 1.0, 0.5, 90)]  # 20: off the keys
    path = write_midi(tmp_path / "a.mid", notes, pedals=[(0.6, 1.0)])
    tok = build_tokenizer("note_list")
    a = tok.encode(symusic.Score(str(path)))
    assert a.shape == (2, 4) and a.dtype == np.float32
    np.testing.assert_allclose(a[0], [0.5, 1.6, 60, 80], atol=2e-3)  # held to the lift
    np.testing.assert_allclose(a[1], [1.0, 1.6, 64, 90], atol=2e-3)
    again = tok.encode(tok.decode(a))
    np.testing.assert_allclose(again, a, atol=0.006)  # the 10 ms grid
    shifted = tok.augment(a, transpose=48, stretch=2.0)  # 64 + 48 = 112 leaves the keyboard
    np.testing.assert_allclose(shifted, [[1.0, 3.2, 108, 80]], atol=4e-3)
    assert tok.decode(np.zeros((3, 5))).note_num() == 0  # garbage never raises


def test_a_clip_is_each_key_s_loudest_velocity_where_it_sounds() -> None:
    notes = np.array([[0.5, 1.5, 60, 127], [1.0, 2.0, 60, 64], [1.7, 1.8, 21, 127],
                      [0.0, 2.0, 72, 100]], np.float32)
    roll = render_clip(notes, start=0.5, seconds=2.0, fps=10)
    assert roll.shape == (88, 20)
    key = 60 - 21
    # two notes on one key: the louder where they overlap
    np.testing.assert_allclose(roll[key, :10], 1.0)
    np.testing.assert_allclose(roll[key, 10:15], 64 / 127, rtol=1e-6)
    assert not roll[key, 15:].any()
    assert roll[0, 12] == 1.0 and roll[0].sum() == 1.0  # a 100 ms note is one frame
    assert not roll[72 - 21].any()  # started before the clip: not in it (one window rule)
    assert np.count_nonzero(roll) == 16


def test_clips_are_a_function_of_the_index_and_cover_the_piece() -> None:
    rng = np.random.default_rng(0)
    on = np.sort(rng.uniform(2, 40, 200))
    notes = np.stack([on, on + 0.3, rng.integers(40, 80, 200), rng.integers(30, 100, 200)],
                     1).astype(np.float32)
    ds = ClipDataset([notes, notes[:50]], [0, 1], 5.0, 10, seed=3, augment=ClipAugmentation())
    again = ClipDataset([notes, notes[:50]], [0, 1], 5.0, 10, seed=3,
                        augment=ClipAugmentation())
    for i in (0, 7, 10**9):
        assert ds[i]["x"].shape == (1, 88, 50) and ds[i]["x"].any()
        assert (ds[i]["x"] == again[i]["x"]).all() and ds[i]["labels"] == again[i]["labels"]
    assert not all((ds[i]["x"] == ds[i + 1]["x"]).all() for i in range(5))
    starts = clip_starts(notes, 5.0)
    assert starts[0] == pytest.approx(on[0]) and starts[-1] + 5.0 == pytest.approx(
        float(notes[:, 1].max()))
    windows = ClipWindows([notes], [0], 5.0, 10)
    assert len(windows) == len(starts) and (windows[0]["x"] == windows[0]["x"]).all()


def test_roc_auc_is_the_share_of_positive_negative_pairs_ranked_right() -> None:
    rng = np.random.default_rng(1)
    scores = np.round(rng.uniform(size=60), 1)  # ties count half
    positive = rng.uniform(size=60) < 0.4
    p, n = scores[positive], scores[~positive]
    brute = ((p[:, None] > n[None]).sum() + 0.5 * (p[:, None] == n[None]).sum()) / (
        len(p) * len(n))
    assert roc_auc(scores, positive) == pytest.approx(brute)
    assert np.isnan(roc_auc(scores, np.ones(60, bool)))


# --- PiJAMA-shaped --------------------------------------------------------------------------
def _line(seconds: float, seed: int) -> list[tuple[int, float, float, int]]:
    """A note every 0.5 s for `seconds`."""
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(40, 90)), 0.5 * k, 0.4, int(rng.integers(40, 100)))
            for k in range(max(1, int(seconds / 0.5)))]


def _pijama(root: Path, rows: list[dict], seconds_of) -> Path:
    write_pijama_csv(root, rows)
    for i, r in enumerate(rows):
        write_midi(root / r["midi_filepath"], _line(seconds_of(r), i))
    return root


def _expected_classes(root: Path, seconds_of, min_minutes: float) -> list[str]:
    """The minutes rule worked out from the catalogue alone: training-split minutes per
    pianist (as written), the pianists over the line, then `other`."""
    rows = {f"pijama-{r['id']}": r for r in csv.DictReader(open(root / "pijama.csv"))}
    minutes: dict[str, float] = {}
    for p in pijama_source(root, pianist=None):
        if p.split == "train":
            minutes[p.style] = minutes.get(p.style, 0) + (seconds_of(rows[p.id]) - 0.1) / 60
    named = sorted(s for s, m in minutes.items() if m >= min_minutes)
    return named + (["other"] if len(named) < len(minutes) else [])


def test_the_judge_trains_on_a_pijama_tree_by_the_minutes_rule(tmp_path: Path) -> None:
    rows = []
    plan = {"Brad Mehldau": (5, 3, 40), "Bill Evans": (5, 3, 40), "Dick Hyman": (6, 2, 30),
            "Kirk Lightsey": (3, 2, 10), "Ahmad Jamal": (2, 1, 10)}  # albums, tunes, seconds
    for artist, (albums, tunes, _) in plan.items():
        for a in range(albums):
            for t in range(tunes):
                rows.append({"id": str(len(rows)), "artist": artist, "album": f"{artist} {a}",
                             "title": f"Tune {t}", "recording_condition": "studio",
                             "midi_filepath": f"data/midi/studio/{artist}/{artist} {a}/"
                                              f"Tune {t}.midi", "split": "train"})

    def seconds_of(r: dict) -> float:
        return plan[r["artist"]][2]

    root = _pijama(tmp_path / "pijama", rows, seconds_of)
    run = tmp_path / "judge"
    assert train([f"run_dir={run}", "data=pijama", f"data.root={root}", "data.pianist=null",
                  "judge.min_minutes=2", "train.max_steps=2", *TINY]) == 0
    ckpt = latest_checkpoint(run)
    info = json.loads((ckpt / "classes.json").read_text())
    expected = _expected_classes(root, seconds_of, 2)
    assert expected == ["Bill Evans", "Brad Mehldau", "Dick Hyman", "other"]
    assert info["classes"] == [*expected, "unlike any pianist"]
    assert info["class_of_style"]["Kirk Lightsey"] == info["class_of_style"]["Ahmad Jamal"] \
        == "other"
    # The generators' splits: a Mehldau-only run deals his albums exactly as the judge did.
    judge = json.loads((run / "splits.json").read_text())
    split_of = {e["id"]: s for s in ("train", "val", "test") for e in judge[s]["pieces"]}
    mehldau = pijama_source(root)  # what mehldau-train data=pijama reads by default
    assert {p.id: p.split for p in mehldau} == {p.id: split_of[p.id] for p in mehldau}
    report = json.loads((run / "judge_report.json").read_text())
    assert report["classes"] == info["classes"] and report["target"] == "Brad Mehldau"
    assert report["pieces"] == len(judge["test"]["pieces"]) and "piece_auc" in report
    for key in ("clip_accuracy", "piece_accuracy", "clip_top5", "piece_top5", "piece_auc"):
        v, lo, hi = report[key]
        assert 0 <= lo <= hi <= 1 and 0 <= v <= 1, key
    assert report["piece_top5"][0] == 1.0  # four classes: the true one is always in the top 5
    assert (run / "confusion.png").stat().st_size > 1000
    md = (run / "judge_report.md").read_text()
    assert "ROC-AUC, Brad Mehldau vs rest" in md and "| other |" in md
    test_line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert test_line["split"] == "test" and "piece_accuracy" in test_line


REAL_CSV = os.environ.get("MEHLDAU_PIJAMA_CSV")


@pytest.mark.skipif(not REAL_CSV, reason="set MEHLDAU_PIJAMA_CSV to PiJAMA's pijama.csv")
def test_the_judge_reads_the_real_pijama_catalogue(tmp_path: Path) -> None:
    """Every row of the published metadata, each MIDI file made here one second per minute of
    the real recording, so the minutes rule at 80/60 gives the classes the real hours would."""
    rows = list(csv.DictReader(open(REAL_CSV, newline="", encoding="utf-8")))

    def seconds_of(r: dict) -> float:
        return max(float(r["duration_sec"]) / 60, 1.0)

    root = _pijama(tmp_path / "pijama", rows, seconds_of)
    run = tmp_path / "judge"
    assert train([f"run_dir={run}", "data=pijama", f"data.root={root}", "data.pianist=null",
                  f"judge.min_minutes={80 / 60}", "train.max_steps=1", *TINY]) == 0
    info = json.loads((latest_checkpoint(run) / "classes.json").read_text())
    assert info["classes"] == [*_expected_classes(root, seconds_of, 80 / 60),
                               "unlike any pianist"]
    assert "Brad Mehldau" in info["classes"] and info["classes"][-2] == "other"
    judge = json.loads((run / "splits.json").read_text())
    split_of = {e["id"]: s for s in ("train", "val", "test") for e in judge[s]["pieces"]}
    mehldau = pijama_source(root)
    assert len(mehldau) == 72
    assert {p.id: p.split for p in mehldau} == {p.id: split_of[p.id] for p in mehldau}


# --- like every branch: memory plan, resume, bad input ------------------------------------------
@pytest.fixture(scope="module")
def players(tmp_path_factory) -> Path:
    """Three 'pianists' as top-level folders, three albums each, two short pieces an album."""
    root = tmp_path_factory.mktemp("players") / "players"
    for k, name in enumerate(("low", "mid", "high")):
        for a in range(3):
            for t in range(2):
                write_midi(root / name / f"album {a}" / f"t{t}.mid",
                           scale_notes(40, base=40 + 14 * k, step=0.2, seed=10 * a + t))
    return root


def test_a_judge_that_cannot_fit_is_refused_before_any_data_is_read(players: Path,
                                                                     tmp_path: Path,
                                                                     capsys) -> None:
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert train([f"run_dir={run}", "data=folder", f"data.root={players}", f"cache_dir={cache}",
                  *TINY, "train.memory_budget_gb=0.001"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "this run does not fit" in err, err
    assert not run.exists() and not cache.exists()


def test_a_killed_judge_resumes_to_the_uninterrupted_numbers(players: Path,
                                                             tmp_path: Path) -> None:
    args = ["data=folder", f"data.root={players}", "data.group_by=album", "train.max_steps=6",
            *TINY]
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert child([f"run_dir={straight}", *args]).returncode == 0
    killed = child([f"run_dir={run}", *args], "after", "4")
    assert killed.returncode == -signal.SIGKILL
    resumed = child([f"run_dir={run}", *args, "train.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    assert records(run) == records(straight)
    assert json.loads((run / "judge_report.json").read_text())["piece_accuracy"] == \
        json.loads((straight / "judge_report.json").read_text())["piece_accuracy"]


def test_bad_input_to_the_judge(players: Path, tmp_path: Path, capsys) -> None:
    def err(args: list[str]) -> str:
        assert train(args) == 2
        text = capsys.readouterr().err.strip()
        assert text.count("\n") == 0 and "Traceback" not in text, text
        return text

    assert "use data=pianists" in err([f"run_dir={tmp_path / 'a'}", *TINY])  # data=demo
    assert "data.pianist=null" in err([f"run_dir={tmp_path / 'b'}", "data=pijama",
                                       f"data.root={tmp_path}", *TINY])
    # One bad file in the corpus is skipped and listed, never fatal.
    data = tmp_path / "players"
    for f in players.rglob("*.mid"):
        (data / f.relative_to(players)).parent.mkdir(parents=True, exist_ok=True)
        (data / f.relative_to(players)).write_bytes(f.read_bytes())
    (data / "mid" / "album 0" / "broken.mid").write_bytes(b"MThd not midi")
    run = tmp_path / "run"
    assert train([f"run_dir={run}", "data=folder", f"data.root={data}", "data.group_by=album",
                  "train.max_steps=1", *TINY]) == 0
    assert "broken.mid" in (run / "skipped.tsv").read_text()
    assert "skipped 1" in capsys.readouterr().err
    # A judge generates nothing, and says so in one line.
    assert generate([f"ckpt={run}", f"out={tmp_path / 'x.mid'}"]) == 2
    text = capsys.readouterr().err.strip()
    assert "style judge" in text and "mehldau-compare judge.run" in text and "\n" not in text
    # A compare whose judge does not know the target is refused before anything generates.
    out = tmp_path / "cmp"
    assert compare([f"runs=[{run}]", f"out={out}", f"judge.run={run}",
                    "judge.target=Nobody"]) == 2
    text = capsys.readouterr().err.strip()
    assert "\n" not in text and "Traceback" not in text
    assert not out.exists()


# --- synthetic pianists: the judge tells them apart, says "no pianist", hears a model --------
# The tiny judge long enough to learn its abstain class (half the clips damaged); the
# left-out controls are exercised on a smaller judge below (each is a training of its own).
JUDGE = ["branch=style_judge", "data=pianists", "model=judge_tiny", "judge.seconds=10",
         "judge.fps=20", "train.max_steps=1500", "train.batch_size=16",
         "train.eval_every=500", "train.ckpt_every=1500", "train.warmup_steps=50",
         "judge.abstain.share=0.5", "judge.abstain.leave_one_out=false", "logger=none"]
# A small Music Transformer that learns a pianist's register, density and touch in 300 steps.
GENERATOR = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.d_ff=128",
             "model.max_seq_len=128", "model.max_relative_position=64", "train.batch_size=8",
             "train.lr=3e-3", "train.warmup_steps=20", "train.max_steps=300",
             "train.eval_every=300", "train.ckpt_every=300", "logger=none"]


@pytest.fixture(scope="module")
def judges(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("judges")
    assert train([f"run_dir={base / 'judge'}", *JUDGE, "judge.target=ada_lowell"]) == 0
    assert train([f"run_dir={base / 'shuffled'}", *JUDGE, "train.max_steps=300",
                  "judge.shuffle_labels=true"]) == 0
    return {"judge": base / "judge", "shuffled": base / "shuffled", "base": base}


def _held_out(run: Path, splits=("val", "test")):
    from mehldau.data.splits import read_manifest
    from mehldau.evaluation.judge_report import HeldOut
    from mehldau.evaluation.style import load_judge
    from mehldau.tokenize.note_list import NoteListTokenizer

    judge = load_judge(run)
    manifest = read_manifest(run / "splits.json")
    pieces = [e for s in splits for e in manifest[s]["pieces"]]
    of = {k: v for s in splits for k, v in judge.info["pieces"][s].items()}
    return judge, HeldOut([NoteListTokenizer().encode_file(e["path"]) for e in pieces],
                          [judge.classes.index(of[e["id"]]) for e in pieces],
                          [e["id"] for e in pieces])


def _held_out_accuracy(run: Path) -> tuple[float, int, float]:
    """Per-piece accuracy over the val and test pieces (both held out: the trainer never
    chooses a checkpoint by them), with the chance level among pianists."""
    from mehldau.evaluation.judge_report import accuracy_of

    judge, held = _held_out(run)
    return accuracy_of(judge, held)["piece_accuracy"][0], len(held.ids), 1 / len(judge.pianists)


def test_a_tiny_judge_tells_synthetic_pianists_apart_and_shuffled_labels_do_not(judges) -> None:
    report = json.loads((judges["judge"] / "judge_report.json").read_text())
    assert report["classes"][-1] == "unlike any pianist" and len(report["classes"]) == 6
    assert report["pieces"] >= 15
    assert report["piece_accuracy"][0] >= 0.9, report["piece_predictions"]
    accuracy, pieces, chance = _held_out_accuracy(judges["judge"])
    assert pieces >= 30 and accuracy >= 0.9
    control = json.loads((judges["shuffled"] / "judge_report.json").read_text())
    assert control["shuffled_labels"]
    accuracy, _, chance = _held_out_accuracy(judges["shuffled"])
    assert accuracy <= chance + 0.2  # near chance: nothing to learn from dealt labels


def test_the_judge_rejects_clips_no_pianist_played_and_its_report_says_so(judges) -> None:
    run = judges["judge"]
    report = json.loads((run / "judge_report.json").read_text())
    fams = report["families"]
    for family in ("random_notes", "shuffled_pitches", "held_clusters"):
        assert fams[family]["rejected"][0] >= 0.9, (family, fams[family])
        assert fams[family]["attributed_to_target"][0] <= 0.05, (family, fams[family])
    assert report["real_rejected"][0] <= 0.1
    # calibration: fitted on val, better on test, and its diagram
    cal = report["calibration"]
    assert cal["fitted"] and cal["after"]["nll"] <= cal["before"]["nll"] + 1e-6
    assert (run / "reliability.png").stat().st_size > 1000
    assert json.loads((run / "calibration.json").read_text())["temperature"] == \
        pytest.approx(cal["temperature"])
    # the gate passes the target's own test clips and not the others'
    gate = report["gate"]
    assert gate["test_pass"]["ada_lowell"][0] >= 0.8
    assert report["target_attributed"]["other pianists"][0] <= 0.1
    md = (run / "judge_report.md").read_text()
    for heading in ("## Rejection", "## Calibration", "## Embedding gate",
                    "## What it leans on", "loudness and density matched"):
        assert heading in md
    # every interval the report prints holds its figure
    import re

    for v, lo, hi in re.findall(r"(\d\.\d+) \[(\d\.\d+), (\d\.\d+)\]", md):
        assert float(lo) <= float(v) <= float(hi), (v, lo, hi)


def test_a_judge_without_the_abstain_class_is_refused_by_compare(judges, tmp_path,
                                                                capsys) -> None:
    run = tmp_path / "plain"
    assert train([f"run_dir={run}", *JUDGE, "train.max_steps=2", "judge.abstain.families=[]"]) \
        == 0
    assert "unlike any pianist" not in json.loads(
        (latest_checkpoint(run) / "classes.json").read_text())["classes"]
    from conftest import MICRO

    gen = tmp_path / "gen"
    assert train([f"run_dir={gen}", "data=pianists", "data.pianist=ada_lowell",
                  "train.max_steps=2", *MICRO]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert compare([f"runs=[{gen}]", f"out={out}", f"judge.run={run}",
                    "judge.target=ada_lowell"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no 'unlike any pianist' class" in err and "\n" not in err and not out.exists()


@pytest.mark.parametrize("pianist", ["clara_voss", "ada_lowell"])
def test_compare_reads_every_row_against_its_ceiling_and_floors(judges, pianist: str) -> None:
    """Random notes and the pianist's own continuations with shuffled pitches are nobody's;
    the pianist's continuations are the pianist's; a branch is placed between them by the
    attributed share, the abstain share and the kernel distance, each with its interval."""
    base = judges["base"]
    gen = base / f"gen_{pianist}"
    assert train([f"run_dir={gen}", "data=pianists", f"data.pianist={pianist}",
                  *GENERATOR]) == 0
    out = base / f"compare_{pianist}"
    assert compare([f"runs=[{gen}]", f"out={out}", "max_prompts=3", "samples_per_prompt=2",
                    "prompt_seconds=5", "seconds=10", "device=cpu",
                    "audio=false", "likelihood=false", "copy_check=false",
                    f"judge.run={judges['judge']}", f"judge.target={pianist}"]) == 0
    report = json.loads((out / "report.json").read_text())
    style, table = report["style"], report["table"]
    assert style["guard"] == {"reference_in_judge_training": 0,
                              "judge_held_out_in_run_training": 0, "forced": False}
    row, others, human = (table[n]["style"] for n in (gen.name, "other pianists", "human"))
    rnd, shuffled = table["random notes"]["style"], table["shuffled pitches"]["style"]
    assert others["clips"] == row["clips"] == human["clips"] == rnd["clips"] == 6
    # the floors: not the target's, and mostly said to be no pianist's at all (a judge
    # without the abstain class gave random notes to the target: 1.00)
    for floor in (rnd, shuffled):
        assert floor["target_share"][0] == 0 and floor["unlike_any_pianist"][0] >= 0.8
    assert others["target_share"][0] == 0
    # the ceiling: the pianist's own continuations, attributed and past the gate
    assert human["target_share"][0] >= 0.8 and human["unlike_any_pianist"][0] <= 0.2
    # every share adds up: attributed to the target, to no pianist, or to another one
    for r in (row, human, rnd, shuffled, others):
        assert r["target_share"][0] + r["unlike_any_pianist"][0] <= 1 + 1e-9
        for key in ("target_share", "unlike_any_pianist", "target_probability"):
            assert 0 <= r[key][1] <= r[key][0] <= r[key][2] <= 1
    # normalised: bounded, or n/a with its reason
    if style["normalised_reason"] is None:
        for r in (row, human, rnd):
            v, lo, hi = r["normalised"]
            assert 0 <= lo <= v <= hi <= 1
        assert rnd["normalised"][0] == 0 and human["normalised"][0] == 1
    else:
        assert row["normalised"] is None and "overlap" in style["normalised_reason"]
    # distances: the kernel distance with its interval beside the pianist's own at that n
    base_k = row["baseline"]["kernel"]
    assert row["baseline"]["n"] == 6 and base_k[1] <= base_k[0] <= base_k[2]
    assert row["kernel"][1] <= row["kernel"][0] <= row["kernel"][2]
    assert rnd["kernel"][0] > max(base_k[2], human["kernel"][0])  # far from the pianist
    md = (out / "report.md").read_text()
    assert f"Target: **{pianist}**" in md and "test accuracy" in md and "*other pianists*" in md
    assert "unlike any pianist" in md and "*shuffled pitches*" in md and "(n=6;" in md
    assert "(a perfectly calibrated judge: " in md  # the judge's ECE read against its noise
    rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r["group"] == "style"]
    assert rows and all("test accuracy" in r["judge"] for r in rows)
    assert (out / "plots" / "style.png").is_file()


def test_controls_leave_each_family_out_and_resume(players: Path, tmp_path: Path) -> None:
    """The left-out judges: one per family (each a judge run that never saw it) and one
    without the abstain class, reported beside the main judge; a run killed among them
    resumes to the same report."""
    args = ["data=folder", f"data.root={players}", "data.group_by=album", "train.max_steps=4",
            "judge.target=low", "judge.abstain.families=[random_notes,held_clusters]",
            *[a for a in TINY if "leave_one_out" not in a]]
    run = tmp_path / "run"
    assert train([f"run_dir={run}", *args]) == 0
    report = json.loads((run / "judge_report.json").read_text())
    assert set(report["leave_one_out"]) == {"random_notes", "held_clusters"}
    for family, row in report["leave_one_out"].items():
        sub = Path(row["run"])
        info = json.loads((latest_checkpoint(sub) / "classes.json").read_text())
        assert info["abstain"]["families"] == [f for f in ("random_notes", "held_clusters")
                                               if f != family]
        assert 0 <= row["auroc"][0] <= 1
    plain = json.loads((latest_checkpoint(Path(report["without_abstain"]["run"]))
                        / "classes.json").read_text())
    assert "unlike any pianist" not in plain["classes"]
    # the cost of the class, paired on the same clips: the difference of the two accuracies,
    # with an interval that holds it
    diff, lo, hi = report["without_abstain"]["difference"]
    assert diff == pytest.approx(report["clip_accuracy"][0]
                                 - report["without_abstain"]["clip_accuracy"][0])
    assert lo <= diff <= hi
    floor = report["calibration"]["after"]["calibrated_floor"]
    assert 0 <= floor[1] <= floor[0] <= floor[2] and floor[2] > 0
    md = (run / "judge_report.md").read_text()
    assert "left out: AUROC" in md and "without the abstain class" in md
    assert "(paired: the same clips" in md and "perfectly calibrated judge" in md
    # killed after the controls began: the resumed run trains only what is missing
    import shutil

    shutil.rmtree(run / "controls" / "without_abstain")
    (run / "judge_report.json").unlink()
    assert train([f"run_dir={run}", *args, "train.resume=true"]) == 0
    again = json.loads((run / "judge_report.json").read_text())
    assert again["leave_one_out"] == report["leave_one_out"]
    assert again["without_abstain"]["clip_accuracy"] == report["without_abstain"][
        "clip_accuracy"]


def test_an_overlap_of_judge_and_runs_is_refused_in_one_line_and_force_warns(
        players: Path, tmp_path: Path, capsys) -> None:
    from conftest import MICRO

    gen, judge = tmp_path / "gen", tmp_path / "judge"
    assert train([f"run_dir={gen}", "data=folder", f"data.root={players}",
                  "data.group_by=album", "train.max_steps=2", *MICRO]) == 0
    assert train([f"run_dir={judge}", "data=folder", f"data.root={players}",
                  "data.group_by=album", "train.max_steps=1", *TINY]) == 0
    # A reference folder the judge trained on: its prompts and human ceiling would be
    # music the judge has learned to recognise.
    trained = json.loads((judge / "splits.json").read_text())["train"]["pieces"]
    album = Path(next(e["path"] for e in trained if "/low/" in e["path"])).parent
    leaked = len(list(album.glob("*.mid")))
    capsys.readouterr()
    args = [f"runs=[{gen}]", "max_prompts=2", "samples_per_prompt=1", "prompt_seconds=2",
            "seconds=4", "device=cpu", "audio=false", "likelihood=false",
            f"judge.run={judge}", "judge.target=low", f"reference={album}"]
    assert compare([*args, f"out={tmp_path / 'refused'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in err and "force=true" in err
    assert f"{leaked} of the {leaked} reference pieces" in err and "judge's training" in err
    assert not (tmp_path / "refused").exists()
    assert compare([*args, f"out={tmp_path / 'forced'}", "force=true"]) == 0
    assert "warning (force=true)" in capsys.readouterr().err
    style = json.loads((tmp_path / "forced" / "report.json").read_text())["style"]
    assert style["guard"]["forced"] and style["guard"]["reference_in_judge_training"] == leaked
    # The other way: a run that trained on a piece the judge holds out as a floor (another
    # class's test piece) is refused too, before anything is generated.
    import shutil

    held = next(e for e in json.loads((judge / "splits.json").read_text())["test"]["pieces"]
                if "/mid/" in e["path"])
    leaky = tmp_path / "leaky"
    shutil.copytree(gen, leaky)
    for manifest in [leaky / "splits.json", *leaky.glob("checkpoints/*/splits.json")]:
        m = json.loads(manifest.read_text())
        m["train"]["pieces"].append({**held, "id": "copy of a held-out piece"})
        manifest.write_text(json.dumps(m))
    capsys.readouterr()
    assert compare([f"runs=[{leaky}]", *args[1:-1], f"out={tmp_path / 'leaky-report'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "generating" not in err, err
    assert "1 of the judge's" in err.splitlines()[-1] and "compared run's training" in err
