"""Hydra as its users know it: -m sweeps with the basic launcher, a record of every run."""

from __future__ import annotations

from pathlib import Path

from conftest import MICRO, make_folder
from omegaconf import OmegaConf

from mehldau.cli.train import main as train


def test_a_2x2_multirun_writes_four_run_directories(tmp_path: Path, capsys) -> None:
    data = make_folder(tmp_path / "data")
    sweep = tmp_path / "sweep"
    assert train(["-m", "seed=0,1", "train.lr=1e-3,2e-3", "data=folder", f"data.root={data}",
                  "train.max_steps=2", f"hydra.sweep.dir={sweep}", *MICRO]) == 0
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        seen.add((cfg.seed, cfg.train.lr))
        assert f"seed={cfg.seed}" in overrides and f"data.root={data}" in overrides
        assert (job / "checkpoints" / "step_0000002" / "model.safetensors").is_file()
        assert (job / "metrics.jsonl").is_file() and (job / "splits.json").is_file()
    assert seen == {(0, 1e-3), (0, 2e-3), (1, 1e-3), (1, 2e-3)}
    # one job's mistake is a line, the others still run
    bad = tmp_path / "bad"
    assert train(["-m", "model.d_model=32,33", "data=folder", f"data.root={data}",
                  "train.max_steps=2", f"hydra.sweep.dir={bad}",
                  *[a for a in MICRO if not a.startswith("model.d_model")]]) == 2
    err = capsys.readouterr().err
    assert "error: job 1 (model.d_model=33" in err and "1 job(s) failed: 1" in err
    assert (bad / "0" / "checkpoints" / "step_0000002").is_dir()


def test_a_single_run_records_its_config_and_overrides(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data")
    args = ["data=folder", f"data.root={data}", f"run_dir={tmp_path / 'run'}",
            "train.max_steps=2", *MICRO]
    assert train(args) == 0
    assert list(OmegaConf.load(tmp_path / "run" / ".hydra" / "overrides.yaml")) == args
    assert OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml").train.max_steps == 2
