"""mehldau-compare end to end on two tiny runs of different branches, and its bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import MICRO, album_names, scale_notes, write_midi

from mehldau.cli.compare import main as compare
from mehldau.cli.train import main as train

PERCEIVER = ["branch=perceiver_mt", "model.n_layers=1", "model.d_model=32", "model.n_heads=2",
             "model.d_ff=64", "model.max_seq_len=96", "model.num_latents=32",
             "model.max_relative_position=64", "train.batch_size=4", "train.warmup_steps=2",
             "train.log_every=2", "train.eval_every=4", "train.ckpt_every=4", "logger=none"]
FAST = ["max_prompts=2", "samples_per_prompt=2", "prompt_seconds=2", "seconds=4",
        "bootstrap=10", "device=cpu"]


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
                 "prompts/p00.mid", "prompts/p00.tiled.mid"):
        assert (out / name).is_file(), name
    assert len(list((out / "midi" / "prod").glob("*.mid"))) == 2 * 2  # prompts x samples
    report = json.loads((out / "report.json").read_text())
    table = report["table"]
    assert {"prod", "perc", "human ceiling", "random notes", "reference"} <= set(table)
    assert report["sampling"] == {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    for name in ("prod", "perc"):
        lik = table[name]["likelihood"]
        assert lik["nats_per_note"][0] > 0 and lik["bits_per_second"][0] > 0
        assert table[name]["cost"]["compute_seconds_per_music_minute"] > 0
        oa = table[name]["features"]["mean"]["oa"]
        assert 0 <= oa[0] <= 1 and oa[1] <= oa[2]
    # the same prompts for every branch: the first 2 s of each continuation are the prompt's
    md = (out / "report.md").read_text()
    assert "| prod (production) |" in md and "*human ceiling*" in md and "n/a" in md
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert {r["system"] for r in rows} >= {"prod", "perc", "human ceiling", "random notes"}
    if (out / "listening").is_dir():  # fluidsynth and a soundfont installed
        key = json.loads((out / "listening" / "answer_key.json").read_text())
        assert {v["system"] for v in key.values()} == {"prod", "perc", "pianist"}
        assert all((out / "listening" / k).is_file() for k in key)
    else:
        assert "audio skipped" in md or "audio=false" in md


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
