"""Every experiment= config composes for its branch with what its header says to add."""

from __future__ import annotations

from pathlib import Path

import pytest

from mehldau.cli.common import compose, config_dir

EXPERIMENTS = sorted(p.relative_to(config_dir() / "experiment").with_suffix("").as_posix()
                     for p in (config_dir() / "experiment").rglob("*.yaml"))


def test_every_branch_has_experiments() -> None:
    assert {e.split("/")[0] for e in EXPERIMENTS} == {
        "production", "perceiver_mt", "moonbeam_lora", "scg_diffusion"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name: str) -> None:
    branch = name.split("/")[0]
    cfg = compose("train", [f"experiment={name}", "data.root=/data/pijama",
                            "init=/weights/base.pt"] if branch == "moonbeam_lora" else
                  [f"experiment={name}", "data.root=/data/pijama"])
    assert cfg.branch.name == branch and cfg.data.source == "pijama"
    assert str(cfg.run_dir).startswith(f"runs/{branch}/")
    header = (config_dir() / "experiment" / f"{name}.yaml").read_text()
    assert f"mehldau-train experiment={name}" in header and "GPU-hour" in header
    if cfg.stage == "adapt":
        assert cfg.data.pianist == "Brad Mehldau" and cfg.init
    if "adapt" in name and branch != "moonbeam_lora":  # chains onto its pretrain run
        assert Path(str(cfg.init)) == Path(f"runs/{branch}/pretrain_pijama")
