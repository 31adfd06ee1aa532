"""The moonbeam_lora branch end to end: from scratch, from a released-layout .pt with LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pretty_midi
import pytest
import torch
from conftest import make_folder
from omegaconf import OmegaConf

from mehldau.adapters import apply_lora
from mehldau.branches.moonbeam_lora.recipe import fold_pedal, model_config
from mehldau.cli.generate import main as generate
from mehldau.cli.train import main as train
from mehldau.errors import UserError
from mehldau.nn.moonbeam import MoonbeamForCausalLM
from mehldau.recipes.adapt import adapter_config

MICRO = ["branch=moonbeam_lora", "model.hidden_size=48", "model.intermediate_size=64",
         "model.num_hidden_layers=1", "model.decoder_hidden_size=32", "model.context_len=48",
         "train.batch_size=2", "train.warmup_steps=2", "train.log_every=2", "train.eval_every=4",
         "train.ckpt_every=4", "train.eval_batch_size=4", "logger=none"]


def micro_config():
    cfg = OmegaConf.load(Path(__file__).parents[2] / "configs/model/moonbeam_tiny.yaml")
    cfg.update({k.split("=")[0].removeprefix("model."): int(k.split("=")[1])
                for k in MICRO if k.startswith("model.")})
    branch = OmegaConf.load(Path(__file__).parents[2] / "configs/branch/moonbeam_lora.yaml")
    adapter = OmegaConf.load(Path(__file__).parents[2] / "configs/adapter/lora.yaml")
    return OmegaConf.create({"model": cfg, "branch": branch, "adapter": adapter})


def write_released(path: Path) -> MoonbeamForCausalLM:
    """A micro model saved as the released files are: outer dict, `module.` prefix, bf16."""
    torch.manual_seed(0)
    model = MoonbeamForCausalLM(model_config(micro_config()))
    sd = {f"module.{k}": v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save({"model_state_dict": sd, "epoch": 3}, path)
    return model


def test_lora_defaults_follow_the_reference_and_leave_the_gru_frozen() -> None:
    cfg = micro_config()
    acfg = adapter_config(cfg)
    assert (acfg.r, acfg.alpha, acfg.dropout) == (8, 32, 0.05)
    model = apply_lora(MoonbeamForCausalLM(model_config(cfg)), acfg)
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters()
            if p.requires_grad}
    assert lora == {"q_proj", "k_proj", "v_proj", "o_proj", "decoder_embedding",
                    "summary_projection", "lm_head", "fc_out"}
    frozen = [n for n, p in model.named_parameters() if ".gru." in n]
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters()
                              if ".gru." in n or "embedding.linear_fme" in n)


def test_scratch_train_generate_then_lora_from_a_released_file(tmp_path: Path, capsys) -> None:
    data = make_folder(tmp_path / "data")
    run = tmp_path / "scratch"
    assert train([f"run_dir={run}", "data=folder", f"data.root={data}", "train.max_steps=4",
                  *MICRO]) == 0
    meta = json.loads((run / "checkpoints" / "step_0000004" / "meta.json").read_text())
    assert meta["branch"] == "moonbeam_lora" and meta["model"] == "MoonbeamForCausalLM"
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["unigram_entropy"] > 5  # nats per event: six attributes
    assert [r for r in lines if r["split"] == "val"][-1]["loss"] > 0
    tok = json.loads((run / "checkpoints" / "step_0000004" / "tokenizer.json").read_text())
    assert tok["config"]["fold_pedal"] is True  # from scratch: pedal folded into durations
    assert fold_pedal(OmegaConf.create({"init": str(run)}), "auto") is True  # the run's own
    out = tmp_path / "s.mid"
    # 120 events: more than the 48-row window, so sampling restarts the window
    assert generate([f"ckpt={run}", f"out={out}", "seconds=600", "max_tokens=120", "seed=1"]) == 0
    notes = pretty_midi.PrettyMIDI(str(out)).instruments[0].notes
    assert len(notes) > 0 and all(21 <= n.pitch <= 108 for n in notes)
    # A prompt's notes that start before the cut are kept whole (rows carry durations).
    prompt = next(data.rglob("*.mid"))
    assert generate([f"ckpt={run}", f"out={tmp_path / 'p.mid'}", f"prompt={prompt}",
                     "prompt_seconds=1", "seconds=1"]) == 0
    played = pretty_midi.PrettyMIDI(str(prompt)).instruments[0].notes
    got = pretty_midi.PrettyMIDI(str(tmp_path / "p.mid")).instruments[0].notes
    longest = max(n.end - n.start for n in played if n.start < 1.0)
    assert longest > 0.6 and any(abs(n.end - n.start - longest) < 0.02 for n in got)

    pt = tmp_path / "moonbeam_micro.pt"
    base = write_released(pt)
    gru_before = base.decoder.gru.weight_hh_l0.to(torch.bfloat16).float().clone()
    ad = tmp_path / "lora"
    assert train([f"run_dir={ad}", f"init={pt}", "data=folder", f"data.root={data}",
                  "train.max_steps=4", *MICRO]) == 0
    ck = ad / "checkpoints" / "step_0000004"
    assert (ck / "adapter" / "adapter_model.safetensors").is_file()
    # The released weights were pretrained with the pedal ignored: so is the adaptation data.
    assert json.loads((ck / "tokenizer.json").read_text())["config"]["fold_pedal"] is False
    pointer = json.loads((ck / "base.json").read_text())
    assert pointer["path"] == str(pt.resolve())
    from mehldau.branches.moonbeam_lora.recipe import load_model

    merged, _ = load_model(ck)
    assert torch.equal(merged.decoder.gru.weight_hh_l0, gru_before)  # the GRU stayed frozen
    assert generate([f"ckpt={ad}", f"out={tmp_path / 'a.mid'}", "seconds=2"]) == 0
    capsys.readouterr()

    # bad inputs: one line, exit 2
    bad = tmp_path / "bad.pt"
    torch.save({"model_state_dict": {"model.norm.weight": torch.ones(7)}}, bad)
    assert train([f"run_dir={tmp_path / 'b'}", f"init={bad}", "data=folder",
                  f"data.root={data}", *MICRO]) == 2
    err = capsys.readouterr().err
    assert "lacks" in err and "Traceback" not in err
    assert train([f"run_dir={tmp_path / 'c'}", "style.enabled=true", "data=folder",
                  f"data.root={data}", *MICRO]) == 2
    assert "no style conditioning" in capsys.readouterr().err


def test_a_typo_in_the_adapter_targets_is_refused_before_anything_is_written(
        tmp_path: Path, capsys) -> None:
    data = make_folder(tmp_path / "data")
    pt = tmp_path / "moonbeam_micro.pt"
    write_released(pt)
    run = tmp_path / "typo"
    assert train([f"run_dir={run}", f"init={pt}", "data=folder", f"data.root={data}",
                  "adapter.targets=[q_proj,summary_projecton]", *MICRO]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "'summary_projecton' is not a module of MoonbeamForCausalLM" in err[-1]
    assert "summary_projection" in err[-1] and "Traceback" not in "\n".join(err)
    assert not run.exists()


def test_released_presets_take_the_reference_numerics() -> None:
    presets = Path(__file__).parents[2] / "configs/model"
    for preset, want in (("moonbeam_309m", True), ("moonbeam_839m", True),
                         ("moonbeam_tiny", False)):
        m = OmegaConf.load(presets / f"{preset}.yaml")
        assert model_config(OmegaConf.create({"model": m})).reference_numerics is want, preset
    m = OmegaConf.load(presets / "moonbeam_309m.yaml")
    m.reference_numerics = False  # a numerics setting: given for a released config too
    assert model_config(OmegaConf.create({"model": m})).reference_numerics is False
    m.reference_numerics = "yes"
    with pytest.raises(UserError, match="reference_numerics must be true or false"):
        model_config(OmegaConf.create({"model": m}))


def test_pedal_handling_follows_the_weights(tmp_path: Path, capsys) -> None:
    pt = tmp_path / "moonbeam.pt"
    pt.write_bytes(b"released weights")
    assert fold_pedal(OmegaConf.create({"init": None}), "auto") is True
    released = OmegaConf.create({"init": str(pt)})
    assert fold_pedal(released, "auto") is False
    assert fold_pedal(released, False) is False and capsys.readouterr().err == ""
    assert fold_pedal(released, True) is True
    assert "pretrained with the pedal ignored" in capsys.readouterr().err
    with pytest.raises(UserError, match="auto, true or false"):
        fold_pedal(released, "yes")


def test_moonbeam_presets_compose(capsys) -> None:
    assert train(["--cfg", "branch=moonbeam_lora"]) == 0
    assert "preset: moonbeam_tiny" in capsys.readouterr().out
    assert train(["--cfg", "branch=moonbeam_lora", "model=moonbeam_309m"]) == 0
    out = capsys.readouterr().out
    assert "released: 309M" in out and "alpha: 32" in out
    assert train(["branch=moonbeam_lora", "model=tiny", "logger=none"]) == 2
    assert "is for branch 'production'" in capsys.readouterr().err


def test_qlora_adapts_a_released_file_on_cpu(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data")
    pt = tmp_path / "moonbeam_micro.pt"
    write_released(pt)
    run = tmp_path / "qlora"
    assert train([f"run_dir={run}", f"init={pt}", "adapter=qlora", "data=folder",
                  f"data.root={data}", "train.max_steps=4", *MICRO]) == 0
    ck = run / "checkpoints" / "step_0000004"
    assert json.loads((ck / "meta.json").read_text())["adapter"] == "qlora"
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r["loss"] for r in lines if r["split"] == "val"]
    assert len(vals) == 2 and all(v == v and v > 0 for v in vals)  # base, then adapted
    assert generate([f"ckpt={run}", f"out={tmp_path / 'q.mid'}", "seconds=2"]) == 0
    assert (tmp_path / "q.mid").is_file()
