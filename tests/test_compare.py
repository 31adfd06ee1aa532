"""mehldau-compare end to end on two tiny runs of different branches, and its bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import MICRO, SCG_MICRO, album_names, scale_notes, write_midi
from omegaconf import OmegaConf

from mehldau.cli.compare import main as compare
from mehldau.cli.train import main as train
from mehldau.evaluation.compare import (
    System,
    feature_table,
    floor_items,
    human_items,
    pair_distances,
    reference_items,
    write_prompts,
)
from mehldau.evaluation.features import cut, read_notes

PERCEIVER = ["branch=perceiver_mt", "model.n_layers=1", "model.d_model=32", "model.n_heads=2",
             "model.d_ff=64", "model.max_seq_len=96", "model.num_latents=32",
             "model.max_relative_position=64", "train.batch_size=4", "train.warmup_steps=2",
             "train.log_every=2", "train.eval_every=4", "train.ckpt_every=4", "logger=none"]
FAST = ["max_prompts=2", "samples_per_prompt=2", "prompt_seconds=2", "seconds=4",
        "device=cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("compare")
    data = base / "data"
    for a, name in enumerate(album_names(data, 6)):  # six albums, one in test; 8 s pieces
        for k in range(2):
            write_midi(data / name / f"piece {k}.mid",
                       scale_notes(48, base=50 + 2 * a + k, step=0.2, seed=10 * a + k))
    prod, perc = base / "prod", base / "perc"
    assert train([f"run_dir={prod}", "data=folder", f"data.root={data}", "train.max_steps=4",
                  *MICRO]) == 0
    assert train([f"run_dir={perc}", "data=folder", f"data.root={data}", "train.max_steps=4",
                  f"split.manifest={prod / 'splits.json'}", *PERCEIVER]) == 0
    return {"base": base, "data": data, "prod": prod, "perc": perc}


def test_compare_writes_every_report_file(runs) -> None:
    out = runs["base"] / "report"
    assert compare([f"runs=[{runs['prod']},{runs['perc']}]", f"out={out}", *FAST]) == 0
    for name in ("report.md", "report.json", "metrics.csv", "plots/oa_per_feature.png",
                 "plots/kde.png", "plots/copy_lengths.png", "plots/pianoroll_p00.png",
                 "prompts/p00.mid"):
        assert (out / name).is_file(), name
    assert len(list((out / "midi" / "prod").glob("*.mid"))) == 2 * 2  # prompts x samples
    report = json.loads((out / "report.json").read_text())
    table = report["table"]
    assert {"prod", "perc", "human", "random notes", "reference"} <= set(table)
    assert report["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    for name in ("prod", "perc"):
        lik = table[name]["likelihood"]
        assert lik["nats_per_note"][0] > 0 and lik["bits_per_second"][0] > 0
        assert table[name]["cost"]["compute_seconds_per_music_minute"] > 0
        oa = table[name]["features"]["mean"]["oa"]
        assert 0 <= oa[0] <= 1 and oa[1] <= oa[2]
    # the same prompts for every branch: the first 2 s of each continuation are the prompt's
    md = (out / "report.md").read_text()
    assert "| prod (production) |" in md and "*human*" in md and "n/a" in md
    # the human and random rows are shaped as a branch's: same prompts, same counts
    assert table["human"]["items"] == table["random notes"]["items"] == table["prod"]["items"]
    first = {e["prompt"]: e for e in reversed(table["human"]["excerpts"])}
    for p in report["prompts"]:
        assert first[p["name"]]["source"] == p["source"] and first[p["name"]]["start"] == 2.0
    assert table["human"]["copy"]["samples"] == table["prod"]["copy"]["samples"]
    # the copy check says what it covered: every training piece of the manifest
    manifest = json.loads((runs["prod"] / "splits.json").read_text())
    coverage = report["copy_coverage"]
    assert coverage["listed"] == coverage["indexed_pieces"] == len(manifest["train"]["pieces"])
    assert coverage["indexed_notes"] > 0 and "Copy check: indexed" in md
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert {r["system"] for r in rows} >= {"prod", "perc", "human", "random notes"}
    if (out / "listening").is_dir():  # fluidsynth and a soundfont installed
        key = json.loads((out / "listening" / "answer_key.json").read_text())
        assert {v["system"] for v in key.values()} == {"prod", "perc", "pianist"}
        assert all((out / "listening" / k).is_file() for k in key)
    else:
        assert "audio skipped" in md or "audio=false" in md


def test_a_missing_training_file_is_named_and_counted(runs, tmp_path, capsys) -> None:
    manifest = json.loads((runs["prod"] / "splits.json").read_text())
    gone = Path(manifest["train"]["pieces"][0]["path"])
    aside = tmp_path / "aside.mid"
    gone.rename(aside)
    try:
        out = tmp_path / "report"
        assert compare([f"runs=[{runs['prod']}]", f"out={out}", "likelihood=false",
                        "audio=false", *FAST]) == 0
    finally:
        aside.rename(gone)
    assert f"1 of {len(manifest['train']['pieces'])} training files are missing" in \
        capsys.readouterr().err
    coverage = json.loads((out / "report.json").read_text())["copy_coverage"]
    assert coverage["missing"] == [str(gone)]
    assert coverage["indexed_pieces"] == coverage["listed"] - 1
    assert "left out: 1 missing" in (out / "report.md").read_text()


def test_compare_bad_runs_are_one_line_errors(runs, tmp_path, capsys) -> None:
    def err(args) -> str:
        assert compare(args) == 2
        e = capsys.readouterr().err.strip()
        assert e.startswith("mehldau-compare: error:") and "Traceback" not in e
        return e

    assert "runs is required" in err([f"out={tmp_path / 'a'}"])
    assert "checkpoint not found" in err([f"runs=[{tmp_path / 'nope'}]", f"out={tmp_path}/b"])
    (tmp_path / "empty_run").mkdir()
    assert "no checkpoint in" in err([f"runs=[{tmp_path / 'empty_run'}]", f"out={tmp_path}/b"])
    # a run split by another rule: one of them might be tested on what it trained on
    other = tmp_path / "other"
    assert train([f"run_dir={other}", "data=folder", f"data.root={runs['data']}",
                  "split.seed=7", "train.max_steps=2", *MICRO]) == 0
    capsys.readouterr()
    assert "split differently" in err([f"runs=[{runs['prod']},{other}]",
                                       f"out={tmp_path / 'c'}", *FAST])
    assert not (tmp_path / "c").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    assert "not empty" in err([f"runs=[{runs['prod']}]", f"out={tmp_path / 'full'}", *FAST])
    assert "seconds must be positive" in err([f"runs=[{runs['prod']}]",
                                              f"out={tmp_path / 'd'}", "seconds=0"])
    # a reference folder with one broken file: skipped and named, the rest compared
    ref = tmp_path / "ref"
    for k in range(3):
        write_midi(ref / f"r{k}.mid", scale_notes(40, step=0.25, seed=k))
    (ref / "broken.mid").write_bytes(b"MThd not really")
    assert compare([f"runs=[{runs['prod']}]", f"out={tmp_path / 'r'}", f"reference={ref}",
                    "audio=false", "likelihood=false", *FAST]) == 0
    assert "skipped reference file" in capsys.readouterr().err
    assert json.loads((tmp_path / "r" / "report.json").read_text())["prompts"][0]["piece"] \
        == "r0.mid"
    meta = json.loads((other / "checkpoints" / "step_0000002" / "meta.json").read_text())
    meta["branch"] = "mystery"
    (other / "checkpoints" / "step_0000002" / "meta.json").write_text(json.dumps(meta))
    assert "unknown branch 'mystery'" in err([f"runs=[{other}]", f"out={tmp_path / 'e'}"])


# --- the protocol, unit by unit -------------------------------------------------------------
def test_pairs_of_one_piece_are_never_distances() -> None:
    """Within the reference and from a system to it, two excerpts of one piece are never a
    pair: a human continuation would otherwise be scored against its own source."""
    rng = np.random.default_rng(0)
    ref = [(k // 3, rng.normal(size=2)) for k in range(9)]  # 3 pieces x 3 segments
    intra, inter = pair_distances(ref, ref)
    across = [float(np.linalg.norm(x - y)) for i, (u, x) in enumerate(ref)
              for v, y in ref[i + 1:] if u != v]
    assert len(across) == 27
    assert np.allclose(np.sort(intra), np.sort(across))
    # the reference as a system: every cross-piece pair twice (a->b and b->a), nothing else
    assert np.allclose(np.sort(inter), np.sort(across * 2))


def _piece(path: Path, seconds: float, base: int, seed: int) -> Path:
    notes = scale_notes(int(seconds / 0.25), base=base, step=0.25, seed=seed)
    return write_midi(path, notes)


def test_the_human_row_is_the_pianists_own_continuation_shaped_as_a_branch(tmp_path) -> None:
    # a: long enough for two spans after the prompt; b: one span only; c: no prompt, spare
    ref = [(name, _piece(tmp_path / f"{name}.mid", secs, base, seed))
           for name, secs, base, seed in (("a", 20, 50, 1), ("b", 8, 56, 2), ("c", 20, 62, 3))]
    cfg = OmegaConf.create({"prompt_seconds": 2.0, "max_prompts": 2, "seconds": 4.0})
    prompts = write_prompts(ref, cfg, tmp_path / "prompts")
    assert [p["piece"] for p in prompts] == ["a", "b"]
    items = human_items(ref, prompts, 2, 2.0, 4.0)
    assert [(it.group, it.piece, it.start) for it in items] == [
        ("a", "a", 2.0), ("a", "a", 6.0),  # what follows the cut, then the next span
        ("b", "b", 2.0), ("b", "c", 2.0)]  # b ends at 8 s: the spare piece's continuation
    for it in items:
        real = cut(read_notes(dict(ref)[it.piece]), it.start, 4.0)
        assert np.array_equal(it.notes.onset, real.onset)
        assert np.array_equal(it.notes.pitch, real.pitch) and it.notes.seconds == 4.0
    floor = floor_items(reference_items(ref, 4.0), prompts, 2, 4.0, seed=0)
    assert [it.group for it in floor] == [it.group for it in items]  # one shape for all
    assert all(it.notes.seconds == 4.0 for it in floor)


def test_the_reference_scores_itself_as_its_own_spread_and_random_notes_do_not(tmp_path) -> None:
    """The calibration a ceiling needs: excerpts drawn like the reference's segments score
    OA near 1 against them; random notes score far lower on the same protocol."""
    ref = [(f"p{k}", _piece(tmp_path / f"p{k}.mid", 16, 48 + 3 * k, k)) for k in range(6)]
    reference = reference_items(ref, 4.0)
    same = System("same", list(reference))
    oa_same = feature_table(same, reference)["mean"]["oa"][0]
    rnd = System("random", floor_items(reference, [{"name": f"q{k}", "piece": p}
                                                   for k, (p, _) in enumerate(ref)], 4, 4.0, 0))
    oa_rnd = feature_table(rnd, reference)["mean"]["oa"][0]
    assert oa_same > 0.9 > 0.5 > oa_rnd


def test_scg_diffusion_continues_the_same_prompts(runs, tmp_path) -> None:
    """scg_diffusion gets the task the token branches get: its files are the prompt as cut,
    then its own notes, and its items are measured from prompt_seconds on."""
    from mehldau.data.corpus import read_score
    from mehldau.tokenize.notes import cut_prompt

    common = ["data=folder", f"data.root={runs['data']}", f"cache_dir={tmp_path / 'cache'}",
              *SCG_MICRO]
    ae, dit = tmp_path / "ae", tmp_path / "dit"
    assert train([f"run_dir={ae}", "stage=autoencoder", *common,
                  f"split.manifest={runs['prod'] / 'splits.json'}"]) == 0
    assert train([f"run_dir={dit}", "stage=diffusion", f"init={ae}", *common]) == 0
    out = tmp_path / "report"
    assert compare([f"runs=[{runs['prod']},{dit}]", f"out={out}", "likelihood=false",
                    "audio=false", "copy_check=false", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert not list((out / "prompts").glob("*.tiled.mid"))  # no rule source: the prompt
    for p in report["prompts"]:
        want = [(round(n.time, 4), n.pitch) for t in cut_prompt(
            read_score(p["path"]), 2.0).tracks for n in t.notes]
        files = sorted((out / "midi" / "dit").glob(f"{p['name']}*.mid"))
        assert len(files) == 2 and want  # samples_per_prompt
        for f in files:
            got = read_notes(f)
            head = sorted((round(float(s), 4), int(q)) for s, q in zip(got.onset, got.pitch)
                          if s < 2.0)
            assert head == sorted(want), f
    table = report["table"]
    assert table["dit"]["items"] == table["prod"]["items"] == table["human"]["items"]
    # its items are measured from the cut on, as every branch's: not over the prompt's notes
    spans = {start: [cut(read_notes(f), start, 4.0) for f in (out / "midi" / "dit").glob("*.mid")]
             for start in (0.0, 2.0)}
    rate = {k: np.mean([len(n) / n.seconds for n in v]) for k, v in spans.items()}
    assert rate[0.0] != rate[2.0]  # the prompt's notes would count
    assert table["dit"]["metrics"]["notes_per_second"][0] == pytest.approx(rate[2.0])
