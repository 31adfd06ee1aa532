"""Strict configs: an unknown key, a wrong type or an out-of-range value fails in one line
naming the key, before any data is read. Every case below points data.root at a folder that
does not exist: had the data been read first, the error would name the folder instead."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mehldau.cli.generate import main as generate
from mehldau.cli.train import main as train
from mehldau.errors import UserError
from mehldau.settings import checked

NO_DATA = ["data=folder", "data.root=/no/such/folder", "logger=none"]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    return err


@pytest.mark.parametrize("args, message", [
    (["train.lr=abc"], "train.lr must be a number, got 'abc'"),
    (["train.lr=-0.001"], "train.lr must be positive, got -0.001"),
    (["train.max_steps=2.5"], "train.max_steps must be a whole number, got 2.5"),
    (["train.min_lr_ratio=2"], "train.min_lr_ratio must be in [0, 1]"),
    (["train.mixed_precision=fp8"], "train.mixed_precision must be auto, no, bf16 or fp16"),
    (["train.resume=maybe"], "train.resume must be true or false, got 'maybe'"),
    (["model.max_seq_len=0"], "model.max_seq_len must be positive, got 0"),
    (["model.n_layers=two"], "model.n_layers must be a whole number, got 'two'"),
    (["split.ratios=[0,0,0]"], "split.ratios"),
    (["split.ratios=[a,b,c]"], "split.ratios must be a list, got ['a', 'b', 'c']"),
    (["augment.stretch_min=0"], "bad augment config"),
    (["seed=x"], "seed must be a whole number, got 'x'"),
    (["stage=adapt", "init=/x", "adapter.r=-1"], "adapter needs r > 0"),
    (["stage=adapt", "init=/x", "adapter.dropout=lots"], "adapter.dropout must be a number"),
    (["+train.lrr=1"], "unknown option 'train.lrr'"),
    (["branch=perceiver_mt", "model.num_latents=-4"], "model.num_latents must be positive"),
    (["branch=scg_diffusion", "stage=autoencoder", "train.stages.autoencoder.lr=-1"],
     "train.lr must be positive"),
])
def test_train_settings_fail_before_any_data_is_read(args, message, tmp_path: Path,
                                                     capsys) -> None:
    run = tmp_path / "run"
    assert train([f"run_dir={run}", *NO_DATA, *args]) == 2
    err = one_line(capsys)
    assert message in err and "data folder not found" not in err, err
    assert not run.exists()


@pytest.mark.parametrize("args, message", [
    (["top_p=1.5"], "top_p must be in (0, 1], got 1.5"),
    (["top_k=-1"], "top_k must be >= 0"),
    (["top_k=many"], "top_k must be a whole number, got 'many'"),
    (["temperature=0"], "temperature must be positive"),
])
def test_generate_settings_fail_before_the_checkpoint_is_read(args, message, tmp_path: Path,
                                                              capsys) -> None:
    # the checkpoint does not exist either: the settings are checked first
    assert generate([f"ckpt={tmp_path / 'none'}", f"out={tmp_path / 'o.mid'}", *args]) == 2
    assert message in one_line(capsys)


@dataclass
class _Example:
    n: int = 1
    x: float = 1.0
    name: str | None = None
    items: list[int] = field(default_factory=list)


def test_checked_types() -> None:
    assert checked(_Example, {"n": 2, "x": 3, "items": [1, 2]}, "ex").x == 3  # int is a float
    for values, message in (({"n": True}, "ex.n must be a whole number, got True"),
                            ({"x": "1"}, "ex.x must be a number"),
                            ({"name": 3}, "ex.name must be a string or null"),
                            ({"items": [1, "a"]}, "ex.items must be a list"),
                            ({"m": 1}, "unknown option 'ex.m'")):
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            checked(_Example, values, "ex")
