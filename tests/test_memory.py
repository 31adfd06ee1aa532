"""The memory plan: printed before the first step, refused in one line (with settings that
would fit) before any data is tokenized, and `micro_batch_size=auto` picks what fits."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import MICRO, make_folder

from mehldau.adapters import AdapterConfig, apply_lora, trainable_parameters
from mehldau.cli.train import main as train
from mehldau.errors import UserError
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


def test_the_plan_is_printed_before_any_data_and_auto_takes_the_whole_batch_when_it_fits(
        data: Path, tmp_path: Path, capsys) -> None:
    assert train([f"run_dir={tmp_path / 'a'}", f"data.root={data}", "data=folder", *MICRO,
                  "train.max_steps=1", "train.batch_size=8", "train.micro_batch_size=auto"]) == 0
    err = capsys.readouterr().err.splitlines()
    plan = next(i for i, ln in enumerate(err) if ln.startswith("memory plan:"))
    assert "for 8 rows" in err[plan] and "micro_batch_size=auto chose 8" in err[plan]
    assert "runtime" in err[plan]
    assert plan < next(i for i, ln in enumerate(err) if ln.startswith("data:"))


def test_auto_picks_the_largest_micro_batch_that_fits_and_a_refusal_names_it(capsys) -> None:
    mib = 2**20
    p = memory.MemoryPlan(weights=10 * mib, gradients=mib, optimizer=2 * mib,
                          activations_per_row=100 * mib, rows=8, runtime=300 * mib)
    budget = p.total(3) + 50 * mib  # between 3 and 4 rows' worth
    assert p.total(3) < budget < p.total(4)
    assert memory.check(p, budget, 8, True, None, auto=True) == 3
    assert "micro_batch_size=auto chose 3" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"train\.micro_batch_size=3") as e:
        memory.check(p, budget, 8, True, None, auto=False)
    assert "\n" not in str(e.value) and "runtime 0.29 GiB" in str(e.value)
    # the runtime is held beside the plan's bytes, outside the margin
    assert p.total(1) == int(memory.MARGIN * (13 * mib + 100 * mib)) + 300 * mib


def test_lora_parameter_count_matches_peft() -> None:
    cfg = MusicTransformerConfig(vocab_size=40, n_layers=2, d_model=32, n_heads=2, d_ff=64,
                                 max_seq_len=16, max_relative_position=8)
    model = MusicTransformer(cfg)
    acfg = AdapterConfig(r=4)
    planned = memory.lora_parameters(model, acfg.target_modules(model), acfg.r)
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


def test_the_plan_leaves_the_codebook_as_it_found_it_and_counts_recomputation() -> None:
    # The VQ-VAE's layers differ in size (no stack of equal blocks): it is probed whole,
    # and its EMA codebook (buffers a training forward moves) must come back unchanged.
    from mehldau.nn.vqvae import VQVAE, VQVAEConfig

    model = VQVAE(VQVAEConfig(channels=[4, 8], strides=[[2, 2], [2, 2]], codebook_size=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = (torch.rand(1, 2, 64, 88) < 0.05).float()

    def probe(rows: int) -> dict:
        return {"x": x.expand(rows, -1, -1, -1)}

    plain = memory.plan(model, probe, 2, checkpointing=False)
    ckpt = memory.plan(model, probe, 2, checkpointing=True)
    after = model.state_dict()
    assert not bool(before["quantizer.initted"])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert ckpt.activations_per_row < plain.activations_per_row


class _Wide(nn.Module):
    """64 MiB of weights, a few KiB of activations a row."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4096, 4096)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).square().mean()


def test_parameters_are_not_counted_as_activations_and_the_step_is() -> None:
    model = _Wide()
    weight = model.lin.weight.numel() * 4
    p = memory.plan(model, lambda rows: {"x": torch.randn(rows, 4096, requires_grad=True)}, 8,
                    checkpointing=False)
    # the weight autograd saves for the backward pass is the parameter itself: held anyway
    assert p.activations_per_row < weight / 1000 and p.activations_fixed < weight / 1000
    # AdamW steps the weight after the backward pass: sqrt and division, two copies of it
    assert p.step_transient == 2 * weight
    assert p.total() == int(memory.MARGIN * (p.static + 2 * weight)) + p.runtime


def test_autocast_copies_of_the_weights_are_kept_once_a_step_not_once_a_row() -> None:
    model = _Wide()
    weight = model.lin.weight.numel() * 4

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    p = memory.plan(model, lambda rows: {"x": torch.randn(rows, 4096, requires_grad=True)}, 8,
                    checkpointing=False, autocast=bf16)
    assert p.activations_per_row < weight / 1000
    # the bf16 copy, and its bf16 gradient in the backward pass: once a step
    assert p.activations_fixed == weight


def test_the_probe_keeps_no_activation_alive() -> None:
    # A hook that kept each saved tensor would tie outputs saved by their own node (softmax,
    # exp) into a reference cycle autograd never frees: every probe's activations leaked.
    cfg = MusicTransformerConfig(vocab_size=40, n_layers=2, d_model=32, n_heads=2, d_ff=64,
                                 max_seq_len=64, max_relative_position=32)
    model = MusicTransformer(cfg)
    x = torch.randint(3, 40, (2, 64))

    def live() -> int:
        gc.collect()
        return sum(o.numel() for o in gc.get_objects() if type(o) is torch.Tensor)

    before = live()
    assert memory.saved_bytes(model, {"input_ids": x, "labels": x})[0] > 0
    assert live() == before


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="no /proc (not Linux)")
def test_a_cpu_budget_counts_what_the_process_already_holds() -> None:
    # MemAvailable leaves out what this process holds (the model already loaded): the
    # budget is that plus the process's resident set.
    rss = memory._kib("/proc/self/status", "VmRSS:")
    budget = memory.budget_bytes(torch.device("cpu"), None)
    available = memory._kib("/proc/meminfo", "MemAvailable:")
    assert rss and available and abs(budget - (available + rss)) < 0.5 * rss
    assert memory.budget_bytes(torch.device("cpu"), 2.0) == 2 * memory.GiB


# Plan against reality: each branch's own train() up to its plan, then two real optimizer
# steps, in a child process whose peak resident set (VmHWM) is measured there, by the child,
# not by the plan's functions (`benchmarks/memory.py --branches` prints the same table).
# Tiny presets hold a few MB of model beside ~300 MB of interpreter and libraries, within
# the noise of what the first steps make resident, so their whole-process peak is checked;
# the mid-size settings hold several hundred MB of model, so their growth over the resident
# set just before the model was built is checked against the plan less its runtime.
MEASURED = {
    ("production", "tiny"): ["model=tiny", "train.batch_size=4"],
    ("production", "mid"): ["model=tiny", "model.d_model=256", "model.d_ff=1024",
                            "model.max_seq_len=512", "train.batch_size=6"],
    ("perceiver_mt", "tiny"): ["model=perceiver_tiny", "train.batch_size=4"],
    ("perceiver_mt", "mid"): ["model=perceiver_tiny", "model.max_seq_len=2048",
                              "model.num_latents=256", "train.batch_size=8"],
    ("moonbeam_lora", "tiny"): ["model=moonbeam_tiny", "train.batch_size=4"],
    ("moonbeam_lora", "mid"): ["model=moonbeam_tiny", "model.context_len=512",
                               "train.batch_size=4", "train.micro_batch_size=null",
                               "train.activation_checkpointing=false"],
    ("scg_autoencoder", "tiny"): ["model=scg_tiny", "stage=autoencoder",
                                  "train.stages.autoencoder.batch_size=4"],
    ("scg_autoencoder", "mid"): ["model=scg_tiny", "stage=autoencoder",
                                 "model.autoencoder.channels=[16,32,64]",
                                 "model.autoencoder_frames=512",
                                 "train.stages.autoencoder.batch_size=8"],
    ("scg_diffusion", "tiny"): ["model=scg_tiny", "stage=diffusion",
                                "train.stages.diffusion.batch_size=4"],
    ("scg_diffusion", "mid"): ["model=scg_tiny", "stage=diffusion", "model.dit.hidden_size=384",
                               "model.dit.depth=4", "model.dit.num_heads=6",
                               "train.stages.diffusion.batch_size=16"],
}
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"


@pytest.fixture(scope="module")
def measured() -> dict:
    """Every child at once, two at a time (one per core): each peak is its own process's."""
    from concurrent.futures import ThreadPoolExecutor

    def child(key: tuple[str, str]) -> dict:
        out = subprocess.run([sys.executable, str(BENCHMARK), "--branch-child", key[0],
                              "--overrides", *MEASURED[key]], capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(MEASURED, pool.map(child, MEASURED)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="no /proc (not Linux)")
@pytest.mark.parametrize("key", list(MEASURED), ids="-".join)
def test_the_plan_is_within_0_8_to_1_3_of_the_measured_peak(measured: dict,
                                                            key: tuple[str, str]) -> None:
    r = measured[key]
    if key[1] == "tiny":
        ratio = r["peak"] / r["plan"]
    else:
        model_part = r["plan"] - r["runtime"]
        assert model_part > 300 * 2**20, "mid-size settings must hold a measurable model"
        ratio = (r["peak"] - r["baseline"]) / model_part
    assert 0.8 <= ratio <= 1.3, (ratio, r)
