"""wandb gets what the config sets, else what its environment variables say, else our
offline default: a user's WANDB_MODE=disabled is never overridden."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from mehldau.train.loggers import make_logger, wandb_settings

WANDB_VARS = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_NAME", "WANDB_RUN_ID")


@pytest.fixture
def clean_env(monkeypatch):
    for var in WANDB_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_defaults_are_offline_in_the_run_directory(clean_env, tmp_path: Path) -> None:
    got = wandb_settings(tmp_path / "run", None, None)
    assert got["mode"] == "offline" and got["project"] == "mehldau"
    assert got["dir"] == str(tmp_path / "run") and got["name"] == "run"


def test_environment_variables_win_over_defaults(clean_env, tmp_path: Path) -> None:
    for var, value in zip(WANDB_VARS, ("disabled", "jazz", str(tmp_path / "w"), "take", "abc")):
        clean_env.setenv(var, value)
    got = wandb_settings(tmp_path / "run", None, None)
    assert got == {"mode": "disabled", "project": "jazz", "dir": str(tmp_path / "w"),
                   "name": "take", "id": "abc"}


def test_the_config_wins_over_the_environment(clean_env, tmp_path: Path) -> None:
    clean_env.setenv("WANDB_MODE", "disabled")
    got = wandb_settings(tmp_path, "mine", "online")
    assert got["mode"] == "online" and got["project"] == "mine"


def test_make_logger_passes_the_user_s_mode_to_wandb(clean_env, tmp_path: Path) -> None:
    seen: dict = {}
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: seen.update(kw) or types.SimpleNamespace(finish=lambda: None)
    clean_env.setitem(sys.modules, "wandb", fake)
    clean_env.setenv("WANDB_MODE", "disabled")
    make_logger({"name": "wandb", "project": None, "mode": None}, tmp_path, {"a": 1}).finish()
    assert seen["mode"] == "disabled" and seen["config"] == {"a": 1}
