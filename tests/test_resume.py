"""Kill and resume: a run killed after a checkpoint, or while writing one, resumes to the
numbers of a run never stopped; Ctrl-C saves and exits 130; a resume that would change the
run is refused before any data is read; the corpus comes from the run's own splits.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MICRO, make_folder, scale_notes, write_midi
from omegaconf import OmegaConf

from mehldau.cli.train import main as train
from mehldau.train.checkpoint import checkpoint_dirs, latest_checkpoint
from mehldau.train.trainer import TrainConfig, lr_factor

ARGS = [*MICRO, "train.log_every=1", "train.eval_every=2", "train.ckpt_every=2",
        "train.keep_last=0"]

# Runs mehldau-train in a child that SIGKILLs itself at a chosen point, as the kernel or a
# cluster scheduler would, so no cleanup handler runs.
KILLER = """
import os, signal, sys
import mehldau.train.checkpoint as C
import mehldau.train.trainer as T
when, at = sys.argv[1], int(sys.argv[2])
if when == "after":
    real = T.save_checkpoint
    def save(run_dir, step, *a, **k):
        out = real(run_dir, step, *a, **k)
        if step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    T.save_checkpoint = save
else:  # "during": weights written, meta and trainer state not yet
    real, calls = C.save_weights, []
    def save(model, d, meta):
        real(model, d, meta)
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGKILL)
    C.save_weights = save
from mehldau.cli.train import main
sys.exit(main(sys.argv[3:]))
"""


def records(run: Path) -> list[tuple]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["split"], r.get("loss"), r.get("lr")) for r in map(json.loads, lines)
            if r["split"] in ("train", "val")]


def child(args: list[str], *killer: str) -> subprocess.CompletedProcess:
    code = ["-c", KILLER, *killer] if killer else ["-m", "mehldau.cli.train"]
    return subprocess.run([sys.executable, *code, *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("resume") / "data")


@pytest.fixture(scope="module")
def reference(data: Path) -> Path:
    run = data.parent / "reference"
    assert train([f"run_dir={run}", "data=folder", f"data.root={data}", "train.max_steps=8",
                  *ARGS]) == 0
    return run


@pytest.mark.parametrize("when, at, resumed_from", [("after", 4, 4), ("during", 3, 4)])
def test_a_killed_run_resumes_to_the_uninterrupted_numbers(when: str, at: int,
                                                           resumed_from: int, data: Path,
                                                           reference: Path,
                                                           tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [f"run_dir={run}", "data=folder", f"data.root={data}", "train.max_steps=8", *ARGS]
    killed = child(args, when, str(at))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # What the kill left: only whole checkpoints count; a half-written one is a temp dir.
    assert latest_checkpoint(run).name == f"step_{resumed_from:07d}"
    half = list((run / "checkpoints").glob(".step_*"))
    assert bool(half) == (when == "during")

    resumed = child([*args, "train.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {latest_checkpoint(run).parent / f'step_{resumed_from:07d}'}" \
        in resumed.stderr
    assert not list((run / "checkpoints").glob(".step_*"))  # the temp dir was cleared
    assert records(run) == records(reference)  # every logged loss and lr, to the digit


def test_ctrl_c_saves_a_checkpoint_and_exits_130(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mehldau.cli.train", f"run_dir={run}",
                             "data=folder", f"data.root={data}", "train.max_steps=100000",
                             *MICRO, "train.ckpt_every=4"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not checkpoint_dirs(run) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert checkpoint_dirs(run), "no checkpoint within 300 s"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted at step" in err and "Traceback" not in err
    step = int(err.split("interrupted at step ")[1].split(";")[0])
    assert latest_checkpoint(run).name == f"step_{step:07d}"


def test_resume_refuses_a_change_to_the_run_before_reading_data(reference: Path, data: Path,
                                                                tmp_path: Path,
                                                                capsys) -> None:
    for change, key in (("model.d_model=64", "model.d_model"),
                        ("branch.tokenizer.name=performance", "branch.tokenizer.name"),
                        ("data.group_by=file", "data.group_by"),
                        ("train.batch_size=8", "train.batch_size")):
        assert train([f"run_dir={reference}", "data=folder", f"data.root={data}",
                      "train.max_steps=8", *ARGS, "train.resume=true", change]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"train.resume: {key} is " in err, err
        assert "force=true" in err


def test_force_resumes_despite_a_change_and_says_so(reference: Path, data: Path,
                                                    tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    import shutil

    shutil.copytree(reference, run)
    assert train([f"run_dir={run}", "data=folder", f"data.root={data}", "train.max_steps=9",
                  *ARGS, "train.resume=true", "augment.transpose=1", "force=true"]) == 0
    assert "warning: train.resume: augment.transpose is 1" in capsys.readouterr().err


def test_more_steps_on_resume_continue_the_decay(reference: Path, data: Path,
                                                tmp_path: Path, capsys) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for late in ("step_0000006", "step_0000008"):  # as if stopped after step 4
        shutil.rmtree(run / "checkpoints" / late)
    assert train([f"run_dir={run}", "data=folder", f"data.root={data}", "train.max_steps=14",
                  *ARGS, "train.resume=true"]) == 0
    assert "max_steps 8 -> 14" in capsys.readouterr().err
    lrs = [lr for step, split, _, lr in records(run) if split == "train"]
    assert lrs[:4] == [lr for _, split, _, lr in records(reference) if split == "train"][:4]
    after = lrs[3:]  # from step 4: falling from where it was, to the floor at the new end
    assert all(b < a for a, b in zip(after, after[1:]))
    train_cfg = OmegaConf.load(latest_checkpoint(run) / "config.yaml").train
    assert after[-1] == pytest.approx(train_cfg.lr * train_cfg.min_lr_ratio)


def test_lr_factor_anchor_is_continuous() -> None:
    cfg = TrainConfig(max_steps=10, warmup_steps=2, lr=1.0, min_lr_ratio=0.1)
    longer = TrainConfig(max_steps=30, warmup_steps=2, lr=1.0, min_lr_ratio=0.1)
    anchor = (6, lr_factor(6, cfg))
    assert lr_factor(6, longer, anchor) == pytest.approx(lr_factor(6, cfg))
    assert lr_factor(30, longer, anchor) == pytest.approx(0.1)
    # without the anchor, the longer schedule would jump back up at step 6
    assert lr_factor(6, longer) > lr_factor(6, cfg) + 0.1


def test_resume_reads_the_run_s_own_corpus(reference: Path, data: Path, tmp_path: Path,
                                           capsys) -> None:
    import shutil

    run, moved = tmp_path / "run", tmp_path / "data"
    shutil.copytree(reference, run)
    shutil.copytree(data, moved)
    (moved / "set 0" / "piece 0.mid").unlink()  # a file the run trained on is gone
    write_midi(moved / "set 9" / "new.mid", scale_notes(64, base=60, seed=99))  # a new one
    write_midi(moved / "set 1" / "piece 1.mid", scale_notes(32, base=50, seed=7))  # changed
    assert train([f"run_dir={run}", "data=folder", f"data.root={data}", "train.max_steps=9",
                  *ARGS, "train.resume=true", f"data.root={moved}", "force=true"]) == 0
    err = capsys.readouterr().err
    assert "resume: 1 files of the run's splits.json are gone" in err
    assert "resume: 1 files are new to the source; left out" in err
    assert "resume: 1 files changed since the run started; their new content is used" in err
    manifest = json.loads((run / "splits.json").read_text())
    ids = {p["id"] for s in ("train", "val", "test") for p in manifest[s]["pieces"]}
    assert not any("new" in i for i in ids) and len(ids) == 7


def test_a_fresh_run_refuses_a_directory_with_another_run_s_files(data: Path,
                                                                  tmp_path: Path,
                                                                  capsys) -> None:
    run = tmp_path / "crashed"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "split": "corpus"}\n'
                                       '{"step": 1, "split": "train", "loss": 9.0}\n')
    assert train([f"run_dir={run}", "data=folder", f"data.root={data}", "train.max_steps=2",
                  *ARGS]) == 2
    assert "holds metrics.jsonl of a run that wrote no checkpoint" in capsys.readouterr().err
    # resume=true starts it over: the crashed run's lines do not mix with the new ones
    assert train([f"run_dir={run}", "data=folder", f"data.root={data}", "train.max_steps=2",
                  *ARGS, "train.resume=true"]) == 0
    assert 9.0 not in [loss for _, _, loss, _ in records(run)]


def test_default_run_directories_differ_within_one_second(data: Path, tmp_path: Path,
                                                          monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert train(["data=folder", f"data.root={data}", "train.max_steps=1", *MICRO]) == 0
    assert len(list((tmp_path / "runs" / "production").iterdir())) == 2
