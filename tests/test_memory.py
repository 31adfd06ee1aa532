"""The memory plan: printed before the first step, refused in one line (with settings that
would fit) before any data is tokenized, and `micro_batch_size=auto` picks what fits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import MICRO, make_folder

from mehldau.adapters import AdapterConfig, apply_lora, trainable_parameters
from mehldau.cli.train import main as train
from mehldau.nn.music_transformer import MusicTransformer, MusicTransformerConfig
from mehldau.train import memory


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("memory") / "data")


def test_a_run_that_cannot_fit_is_refused_before_any_data_is_tokenized(data: Path,
                                                                       tmp_path: Path,
                                                                       capsys) -> None:
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert train([f"run_dir={run}", "data=folder", f"data.root={data}", f"cache_dir={cache}",
                  *MICRO, "train.memory_budget_gb=0.001"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert "this run does not fit" in err and "train.activation_checkpointing=true" in err
    assert "train.micro_batch_size=" not in err  # not even one row fits in 1 MiB
    assert not run.exists() and not cache.exists()  # nothing listed, tokenized or written


def _sizes(line: str) -> dict[str, float]:
    """The byte figures of a printed plan line."""
    found = re.findall(r"(weights|gradients|optimizer|activations) ([\d.]+) ([GM]iB)", line)
    return {k: float(v) * (memory.GiB if u == "GiB" else 2**20) for k, v, u in found}


def test_the_plan_is_printed_and_auto_picks_the_largest_micro_batch_that_fits(
        data: Path, tmp_path: Path, capsys) -> None:
    base = [f"data.root={data}", "data=folder", *MICRO, "train.max_steps=1",
            "train.batch_size=8"]
    assert train([f"run_dir={tmp_path / 'a'}", *base]) == 0
    line = next(ln for ln in capsys.readouterr().err.splitlines()
                if ln.startswith("memory plan:"))
    assert "for 8 rows" in line
    sizes = _sizes(line)
    per_row = sizes["activations"] / 8
    static = sizes["weights"] + sizes["gradients"] + sizes["optimizer"]
    # a budget between 3 and 4 rows' worth: auto must choose 3
    budget = memory.MARGIN * (static + 3.5 * per_row) / memory.GiB
    assert train([f"run_dir={tmp_path / 'b'}", *base, "train.micro_batch_size=auto",
                  f"train.memory_budget_gb={budget}"]) == 0
    assert "micro_batch_size=auto chose 3" in capsys.readouterr().err
    # the same budget without auto: refused, naming the micro-batch that fits
    assert train([f"run_dir={tmp_path / 'c'}", *base, f"train.memory_budget_gb={budget}"]) == 2
    assert "train.micro_batch_size=3" in capsys.readouterr().err


def test_lora_parameter_count_matches_peft() -> None:
    cfg = MusicTransformerConfig(vocab_size=40, n_layers=2, d_model=32, n_heads=2, d_ff=64,
                                 max_seq_len=16, max_relative_position=8)
    model = MusicTransformer(cfg)
    acfg = AdapterConfig(r=4)
    planned = memory.lora_parameters(model, acfg.target_modules(), acfg.r)
    trainable, _ = trainable_parameters(apply_lora(model, acfg))
    assert planned == trainable > 0


def test_checkpointing_lowers_the_planned_activations() -> None:
    cfg = MusicTransformerConfig(vocab_size=40, n_layers=4, d_model=32, n_heads=2, d_ff=64,
                                 max_seq_len=64, max_relative_position=32)
    model = MusicTransformer(cfg)

    def probe(rows: int) -> dict:
        x = torch.randint(3, 40, (rows, 64))
        return {"input_ids": x, "labels": x}

    plain = memory.plan(model, probe, 4, checkpointing=False)
    ckpt = memory.plan(model, probe, 4, checkpointing=True)
    assert ckpt.activations_per_row < 0.5 * plain.activations_per_row
    assert plain.total(8) > plain.total(4) > plain.static
