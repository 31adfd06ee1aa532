"""The perceiver_mt branch end to end through the CLI: pretrain, generate, QLoRA adapt."""

from __future__ import annotations

import json
from pathlib import Path

import pretty_midi
from conftest import make_folder

from mehldau.cli.generate import main as generate
from mehldau.cli.train import main as train

MICRO = ["branch=perceiver_mt", "model.n_layers=2", "model.d_model=32", "model.n_heads=2",
         "model.d_ff=64", "model.max_seq_len=96", "model.num_latents=32",
         "model.max_relative_position=64", "train.batch_size=4", "train.warmup_steps=2",
         "train.log_every=2", "train.eval_every=4", "train.ckpt_every=4", "logger=none"]


def test_perceiver_pretrain_generate_and_qlora_adapt(tmp_path: Path, capsys) -> None:
    data = make_folder(tmp_path / "data")
    run = tmp_path / "pre"
    assert train([f"run_dir={run}", "data=folder", f"data.root={data}", "train.max_steps=4",
                  *MICRO]) == 0
    meta = json.loads((run / "checkpoints" / "step_0000004" / "meta.json").read_text())
    assert meta["branch"] == "perceiver_mt" and meta["model"] == "PerceiverAR"
    vals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()
            if '"val"' in ln]
    assert vals and vals[-1]["loss"] > 0
    out = tmp_path / "p.mid"
    # 8 s of music needs more tokens than M = 96: sampling crosses cache refills.
    assert generate([f"ckpt={run}", f"out={out}", "seconds=8", "seed=1"]) == 0
    pm = pretty_midi.PrettyMIDI(str(out))
    assert pm.instruments[0].program == 0 and len(pm.instruments[0].notes) > 0
    ad = tmp_path / "ad"
    assert train([f"run_dir={ad}", "stage=adapt", f"init={run}", "adapter=qlora",
                  "data=folder", f"data.root={data}", "train.max_steps=2", *MICRO]) == 0
    assert (ad / "checkpoints" / "step_0000002" / "adapter").is_dir()
    assert generate([f"ckpt={ad}", f"out={tmp_path / 'q.mid'}", "seconds=2"]) == 0
    # a production checkpoint is not a perceiver base, and vice versa
    assert train([f"run_dir={tmp_path / 'x'}", "stage=adapt", f"init={run}", "data=folder",
                  f"data.root={data}", "logger=none"]) == 2
    assert "is a 'perceiver_mt' checkpoint" in capsys.readouterr().err


def test_perceiver_presets_compose(capsys) -> None:
    assert train(["--cfg", "branch=perceiver_mt"]) == 0
    out = capsys.readouterr().out
    assert "num_latents: 128" in out and "max_seq_len: 1024" in out
    assert train(["--cfg", "branch=perceiver_mt", "model=perceiver_base"]) == 0
    assert "max_seq_len: 8192" in capsys.readouterr().out
    assert train(["branch=perceiver_mt", "model=tiny", "logger=none"]) == 2
    assert "is for branch 'production'" in capsys.readouterr().err
