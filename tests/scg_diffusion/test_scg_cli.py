"""The scg_diffusion branch end to end: autoencoder stage, diffusion stage, guided generation."""

from __future__ import annotations

import json
from pathlib import Path

import pretty_midi
import pytest
import torch
from conftest import SCG_MICRO, make_folder
from omegaconf import OmegaConf

from mehldau.cli.generate import main as generate
from mehldau.cli.train import main as train
from mehldau.data.splits import lineage_manifests, read_manifest
from mehldau.guidance.rules import targets_from_midi, targets_to_json
from mehldau.recipes.run import train_config
from mehldau.tokenize.pianoroll import PianoRollTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
MICRO = SCG_MICRO


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scg")
    data = make_folder(root / "data")
    ae, dit = root / "ae", root / "dit"
    common = ["data=folder", f"data.root={data}", f"cache_dir={root / 'cache'}", *MICRO]
    assert train([f"run_dir={ae}", "stage=autoencoder", *common]) == 0
    assert train([f"run_dir={dit}", "stage=diffusion", f"init={ae}", *common]) == 0
    return {"data": data, "ae": ae, "dit": dit, "root": root, "common": common}


def test_both_stages_train_and_report(runs) -> None:
    ae_lines = [json.loads(ln) for ln in (runs["ae"] / "metrics.jsonl").read_text().splitlines()]
    report = [r for r in ae_lines if "note_f1" in r]
    assert len(report) == 1 and 0 <= report[0]["note_f1"] <= 1
    assert 0 < report[0]["codebook_usage"] <= 1
    ck = runs["dit"] / "checkpoints" / "step_0000004"
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["stage"] == "diffusion" and meta["model"] == "LatentDiffusion"
    mcfg = json.loads((ck / "model_config.json").read_text())
    assert mcfg["latent_scale"] > 0 and mcfg["frames"] == 256
    # The autoencoder inside the diffusion checkpoint is the stage-1 one, unchanged.
    from safetensors.torch import load_file

    a = load_file(str(runs["ae"] / "checkpoints" / "step_0000004" / "model.safetensors"))
    d = load_file(str(ck / "model.safetensors"))
    assert all(torch.equal(v, d[f"autoencoder.{k}"]) for k, v in a.items())
    vals = [r["loss"] for r in map(json.loads, (runs["dit"] / "metrics.jsonl").read_text()
                                   .splitlines()) if r["split"] == "val" and "loss" in r]
    assert vals and all(v > 0 for v in vals)
    # what the autoencoder learned to reconstruct is in the diffusion checkpoint's lineage
    assert lineage_manifests(ck) == [
        (str(ck), read_manifest(runs["dit"] / "splits.json")),
        (str(runs["ae"] / "checkpoints" / "step_0000004"), read_manifest(runs["ae"]))]


def test_guided_generation_writes_midi_and_losses(runs, tmp_path: Path) -> None:
    ref = next(runs["data"].rglob("*.mid"))
    out = tmp_path / "g.mid"
    assert generate([f"ckpt={runs['dit']}", f"out={out}", f"rules.reference={ref}",
                     "rules.use=[note_density,pitch_histogram]", "scg.candidates=3",
                     "sampler.steps=5", "num_samples=2", "seed=7"]) == 0
    for i in (1, 2):
        mid, js = tmp_path / f"g_{i}.mid", tmp_path / f"g_{i}.json"
        assert mid.is_file() and (tmp_path / f"g_{i}.unguided.mid").is_file()
        pretty_midi.PrettyMIDI(str(mid))  # readable
        report = json.loads(js.read_text())
        assert set(report["guided"]) == set(report["unguided"]) == {"note_density",
                                                                   "pitch_histogram"}
        assert report["seed"] == 7 and report["scg"]["candidates"] == 3
    # The targets are the reference excerpt's features (2.56 s = the model's 256 frames).
    want = targets_to_json(targets_from_midi(ref, PianoRollTokenizer(), 2.56,
                                             ["note_density", "pitch_histogram"]))
    got = json.loads((tmp_path / "g_1.json").read_text())["targets"]
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(torch.tensor(got[k]), torch.tensor(want[k]))
    # The same targets given as JSON reproduce the outputs exactly.
    again = tmp_path / "again.mid"
    assert generate([f"ckpt={runs['dit']}", f"out={again}",
                     f"rules.targets={tmp_path / 'g_1.json'}",
                     "rules.use=[note_density,pitch_histogram]", "scg.candidates=3",
                     "sampler.steps=5", "seed=7"]) == 0
    assert again.read_bytes() == (tmp_path / "g_1.mid").read_bytes()


def test_without_rules_it_samples_unguided(runs, tmp_path: Path) -> None:
    out = tmp_path / "u.mid"
    assert generate([f"ckpt={runs['dit']}", f"out={out}", "sampler.steps=3"]) == 0
    assert out.is_file() and not out.with_suffix(".json").exists()


def test_solvers_sample_unguided_and_guided(runs, tmp_path: Path) -> None:
    # The deterministic DPM-Solver++ samples without rules; its SDE variant guides (that its
    # unguided draw is the plain sampler's, seed for seed, is tested on latents in test_scg).
    ref = next(runs["data"].rglob("*.mid"))
    out = tmp_path / "ode.mid"
    assert generate([f"ckpt={runs['dit']}", f"out={out}", "sampler.steps=4",
                     "sampler.name=dpmpp_2m"]) == 0
    assert out.is_file()
    guided = tmp_path / "g.mid"
    common = [f"ckpt={runs['dit']}", "sampler.steps=4", "sampler.name=dpmpp_2m_sde", "seed=3"]
    assert generate([*common, f"out={guided}", f"rules.reference={ref}",
                     "scg.candidates=3"]) == 0
    assert json.loads(guided.with_suffix(".json").read_text())["sampler"] == "dpmpp_2m_sde"


def test_stage_defaults_fill_only_null_train_keys() -> None:
    full = OmegaConf.load(Path(__file__).parents[2] / "configs/train/default.yaml")
    full.merge_with({"max_steps": None, "lr": 0.5,
                     "stages": {"autoencoder": {"max_steps": 7, "lr": 1.0}}})
    tc = train_config(OmegaConf.create({"train": full, "seed": 0}), "autoencoder")
    assert tc.max_steps == 7 and tc.lr == 0.5  # the stage fills nulls, a given value stays


@pytest.mark.parametrize("args, message", [
    (["stage=pretrain"], "two stages"),
    (["stage=diffusion"], "needs init="),
    (["stage=autoencoder", "init=/nowhere"], "drop init="),
    (["stage=autoencoder", "model.autoencoder_frames=62"], "multiple of"),
    (["stage=autoencoder", "model.autoencoder.kind=gan"], "bad model.autoencoder"),
])
def test_bad_training_input_is_one_line(runs, tmp_path: Path, capsys, args, message) -> None:
    run = tmp_path / "bad"
    assert train([f"run_dir={run}", *runs["common"], *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (run / "checkpoints").exists()


def test_diffusion_init_must_be_an_autoencoder_run(runs, tmp_path: Path, capsys) -> None:
    assert train([f"run_dir={tmp_path / 'x'}", "stage=diffusion", f"init={runs['dit']}",
                  *runs["common"]]) == 2
    assert "needs an scg_diffusion autoencoder run" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["prompt=REF", "prompt_seconds=0.03"], "shorter than one latent row"),
    (["rules.use=[tempo]", "rules.reference=REF"], "unknown rule 'tempo'"),
    (["rules.reference=/no/such.mid"], "rules.reference not found"),
    (["rules.reference=REF", "sampler.eta=0"], "stochastic sampler"),
    (["rules.reference=REF", "sampler.name=dpmpp_2m"], "stochastic sampler"),
    (["sampler.name=euler"], "unknown solver 'euler'"),
    (["rules.reference=REF", "sampler.steps=5000"], "sampler.steps"),
    (["rules.targets=BADJSON"], "has no 'pitch_histogram' target"),
])
def test_bad_generation_input_is_one_line(runs, tmp_path: Path, capsys, args, message) -> None:
    ref = next(runs["data"].rglob("*.mid"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"targets": {"note_density": [[0.0, 0.0], [0.0, 0.0]]}}))
    args = [a.replace("REF", str(ref)).replace("BADJSON", str(bad)) for a in args]
    out = tmp_path / "o.mid"
    assert generate([f"ckpt={runs['dit']}", f"out={out}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_generating_from_the_autoencoder_run_is_refused(runs, tmp_path: Path, capsys) -> None:
    assert generate([f"ckpt={runs['ae']}", f"out={tmp_path / 'o.mid'}"]) == 2
    assert "stage=diffusion" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["autoencoder", "diffusion"])
def test_a_stage_that_cannot_fit_is_refused_before_any_data_is_read(runs, stage: str,
                                                                     tmp_path: Path,
                                                                     capsys) -> None:
    run, cache = tmp_path / "run", tmp_path / "cache"
    init = [f"init={runs['ae']}"] if stage == "diffusion" else []
    assert train([f"run_dir={run}", f"stage={stage}", *init, "data=folder",
                  f"data.root={runs['data']}", f"cache_dir={cache}", *MICRO,
                  "train.memory_budget_gb=0.0001"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "this run does not fit" in err, err
    assert not run.exists() and not cache.exists()


def test_the_plan_picks_a_micro_batch_for_the_autoencoder(runs, tmp_path: Path,
                                                          capsys) -> None:
    assert train([f"run_dir={tmp_path / 'a'}", "stage=autoencoder", *runs["common"],
                  "train.max_steps=1", "train.micro_batch_size=auto"]) == 0
    assert "micro_batch_size=auto chose 2" in capsys.readouterr().err  # the whole batch
