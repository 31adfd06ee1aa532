"""Several processes through accelerate, on CPU with the gloo backend: two processes with half
the batch each train as one process with the whole batch (the same samples, split without
overlap), and only the main process writes the run's files.

`torchrun --standalone` starts the processes, with ACCELERATE_USE_CPU=true so accelerate
takes the CPU (gloo) path, and once without it: the trainer takes that path itself when no
accelerator is there (before, each process trained alone into the same run directory). On
GPUs, `accelerate launch --multi_gpu --num_processes N` does the same through the same
torchrun machinery.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import make_folder

from mehldau.cli.train import main as train
from mehldau.data.dataset import CounterSampler

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

COMMON = ["data=folder", "train.warmup_steps=1", "train.log_every=1", "logger=none"]
STEPS = ["train.max_steps=4", "train.eval_every=4", "train.ckpt_every=2"]
# Each branch's tiny model without dropout; the key of its per-process batch; how close the
# two runs' losses must be (nats per token or event; for the VQ-VAE, relative: its codebook
# is initialised and revived from one process's batch, not the global one).
BRANCHES = {
    "production": (["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
                    "model.max_seq_len=64", "model.max_relative_position=32",
                    "model.dropout=0", *STEPS], "train.batch_size", 1e-4, 0.0),
    "perceiver_mt": (["branch=perceiver_mt", "model.n_layers=2", "model.d_model=32",
                      "model.n_heads=2", "model.d_ff=64", "model.max_seq_len=96",
                      "model.num_latents=32", "model.max_relative_position=64",
                      "model.dropout=0", "model.prefix_dropout=0", *STEPS],
                     "train.batch_size", 1e-4, 0.0),
    "moonbeam_lora": (["branch=moonbeam_lora", *STEPS], "train.batch_size", 1e-4, 0.0),
    "scg_diffusion": (["branch=scg_diffusion", "model=scg_tiny", "stage=autoencoder",
                       *(s.replace("train.", "train.stages.autoencoder.") for s in STEPS)],
                      "train.stages.autoencoder.batch_size", 0.0, 0.02),
}


def lines(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("branch, cpu_variable", [*((b, True) for b in sorted(BRANCHES)),
                                                   ("production", False)])
def test_two_processes_train_as_one_with_the_same_global_batch(branch: str, cpu_variable: bool,
                                                               tmp_path: Path) -> None:
    args, batch, atol, rtol = BRANCHES[branch]
    data = make_folder(tmp_path / "data")
    one, two = tmp_path / "one", tmp_path / "two"
    assert train([f"run_dir={one}", f"data.root={data}", f"{batch}=4", *COMMON, *args]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu_variable:
        env["ACCELERATE_USE_CPU"] = "true"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "mehldau.cli.train", f"run_dir={two}", f"data.root={data}", f"{batch}=2",
         *COMMON, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    a, b = lines(one), lines(two)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b]
    for x, y in zip(a, b):  # every logged loss (the mean over both processes) and lr
        if "loss" in x:
            assert y["loss"] == pytest.approx(x["loss"], abs=atol, rel=rtol), (x, y)
        if "lr" in x:
            assert x["lr"] == pytest.approx(y["lr"])
    # Only the main process wrote: one header, one line per step and split, one record.
    assert sum(r["split"] == "corpus" for r in b) == 1
    assert (two / ".hydra" / "overrides.yaml").is_file()
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_0000002",
                                                                      "step_0000004"]
    assert done.stderr.count("data: 8 pieces") == 1


@pytest.mark.parametrize("branch", ["production", "scg_diffusion"])
def test_a_world_size_accelerate_did_not_set_up_is_refused(branch: str, tmp_path: Path,
                                                           monkeypatch, capsys) -> None:
    # WORLD_SIZE says two processes, but no launcher started this one (no LOCAL_RANK):
    # accelerate sets up one, which would train alone.
    args = BRANCHES[branch][0]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    run = tmp_path / "run"
    assert train([f"run_dir={run}", f"data.root={make_folder(tmp_path / 'data')}", *COMMON,
                  *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "WORLD_SIZE=2 says 2 processes, but accelerate set up 1" in err[0]
    assert "ACCELERATE_USE_CPU=true torchrun" in err[0] and "accelerate launch" in err[0]
    assert not run.exists()


@pytest.mark.parametrize("world, batch", [(2, 3), (4, 2), (3, 5)])
def test_processes_share_the_samples_without_overlap(world: int, batch: int) -> None:
    # Each step, rank r takes its `batch` samples from one counter: together they are the
    # single process's `world * batch` samples of that step, and no sample twice.
    for start in (0, 7 * world * batch):
        per_rank = []
        for rank in range(world):
            it = iter(CounterSampler(start=start, rank=rank, world=world))
            per_rank.append([next(it) for _ in range(batch)])
        taken = [i for r in per_rank for i in r]
        assert len(set(taken)) == len(taken)
        assert sorted(taken) == list(range(start, start + world * batch))
