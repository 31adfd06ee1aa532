"""stage=adapt end to end: LoRA and QLoRA on a pretrained base, generate, merge, bad input."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import MICRO, make_folder, scale_notes, write_midi
from test_data import PIJAMA_HEADER

from mehldau.cli.generate import main as generate
from mehldau.cli.merge import main as merge
from mehldau.cli.train import main as train
from mehldau.data.splits import lineage_manifests, read_manifest


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("adapt")
    data = make_folder(base / "data")
    # The adaptation corpus: other pieces, in their own album folders.
    target = base / "target"
    for a in range(3):
        for k in range(2):
            write_midi(target / f"album {a}" / f"t{k}.mid",
                       scale_notes(64, base=64 + a, step=0.2, seed=100 + 10 * a + k))
    pre = base / "pre"
    assert train([f"run_dir={pre}", "data=folder", f"data.root={data}", "train.max_steps=8",
                  *MICRO]) == 0
    lora = base / "lora"
    assert train([f"run_dir={lora}", "stage=adapt", f"init={pre}", "adapter=lora",
                  "data=folder", f"data.root={target}", "train.max_steps=8", "train.lr=1e-2",
                  *MICRO]) == 0
    return {"data": data, "target": target, "pre": pre, "lora": lora, "tmp": base}


def records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_adapt_saves_only_the_adapter_and_reports_base_loss(runs) -> None:
    ckpt = runs["lora"] / "checkpoints" / "step_0000008"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists()
    pointer = json.loads((ckpt / "base.json").read_text())
    assert Path(pointer["path"]) == (runs["pre"] / "checkpoints" / "step_0000008").resolve()
    adapter_bytes = (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size
    base_bytes = (Path(pointer["path"]) / "model.safetensors").stat().st_size
    assert adapter_bytes < base_bytes / 3
    recs = records(runs["lora"])
    base = [r for r in recs if r.get("model") == "base"]
    adapted = [r for r in recs if r["split"] == "val" and "model" not in r]
    assert len(base) == 1 and base[0]["step"] == 0
    assert adapted[-1]["step"] == 8
    # lr 1e-2 on a corpus the base never saw: the adapter must have learned something
    assert adapted[-1]["loss"] < base[0]["loss"]


def test_the_copy_check_of_an_adapted_run_indexes_its_bases_training_pieces(runs) -> None:
    """Copying would come from the base's pretraining data as much as from the adapter's."""
    from mehldau.evaluation.compare import load_runs, training_files

    files, coverage = training_files(load_runs([str(runs["lora"])]))
    own = read_manifest(runs["lora"] / "splits.json")["train"]["pieces"]
    base = read_manifest(runs["pre"] / "splits.json")["train"]["pieces"]
    assert {Path(e["path"]) for e in own} <= set(files)
    assert {Path(e["path"]) for e in base} <= set(files)
    assert coverage["listed"] == len(files) == len({e["path"] for e in [*own, *base]})
    assert coverage["missing"] == [] and coverage["unknown_training_data"] == []


def test_generate_from_adapter_equals_generate_from_merged(runs, capsys) -> None:
    tmp = runs["tmp"]
    assert generate([f"ckpt={runs['lora']}", f"out={tmp / 'a.mid'}", "seconds=5",
                     "seed=4"]) == 0
    merged = tmp / "merged"
    assert merge([f"ckpt={runs['lora']}", f"out={merged}"]) == 0
    assert (merged / "model.safetensors").is_file()
    assert json.loads((merged / "meta.json").read_text())["stage"] == "pretrain"
    assert generate([f"ckpt={merged}", f"out={tmp / 'm.mid'}", "seconds=5", "seed=4"]) == 0
    assert (tmp / "a.mid").read_bytes() == (tmp / "m.mid").read_bytes()
    # merging twice into the same folder is refused
    assert merge([f"ckpt={runs['lora']}", f"out={merged}"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_qlora_is_measured_generated_and_merged_on_its_4bit_base(runs, capsys) -> None:
    tmp = runs["tmp"]
    run = tmp / "qlora"
    assert train([f"run_dir={run}", "stage=adapt", f"init={runs['pre']}", "adapter=qlora",
                  "data=folder", f"data.root={runs['target']}", "train.max_steps=4",
                  "train.lr=1e-2", *MICRO]) == 0
    meta = json.loads((run / "checkpoints" / "step_0000004" / "meta.json").read_text())
    assert meta["adapter"] == "qlora" and meta["stage"] == "adapt"
    vals = [r for r in records(run) if r["split"] == "val"]
    assert len(vals) == 2 and all(v["loss"] == v["loss"] for v in vals)  # finite, logged
    # "before adapting" is the 4-bit base the adapter trains on, not the fp32 one LoRA sees
    q_base = next(r["loss"] for r in records(run) if r.get("model") == "base")
    fp_base = next(r["loss"] for r in records(runs["lora"]) if r.get("model") == "base")
    assert q_base != fp_base and abs(q_base - fp_base) < 0.1
    assert generate([f"ckpt={run}", f"out={tmp / 'q.mid'}", "seconds=2"]) == 0
    assert "QLoRA adapter on its base's NF4 weights" in capsys.readouterr().err
    merged = tmp / "q_merged"
    assert merge([f"ckpt={run}", f"out={merged}"]) == 0
    assert "NF4" in json.loads((merged / "meta.json").read_text())["base_weights"]
    # The merged model is the trained one: its val loss (the "base" line of an adaptation
    # that starts from it) is the QLoRA run's last val loss.
    again = tmp / "from_merged"
    assert train([f"run_dir={again}", "stage=adapt", f"init={merged}", "adapter=lora",
                  "data=folder", f"data.root={runs['target']}", "train.max_steps=1",
                  *MICRO]) == 0
    merged_loss = next(r["loss"] for r in records(again) if r.get("model") == "base")
    assert merged_loss == pytest.approx(vals[-1]["loss"], abs=2e-4)


def test_adapt_resume_reproduces_the_uninterrupted_run(runs, tmp_path: Path) -> None:
    src = runs["lora"]
    run = tmp_path / "resumed"
    shutil.copytree(src / "checkpoints" / "step_0000004", run / "checkpoints" / "step_0000004")
    (run / "metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in records(src) if r["step"] <= 4))
    assert train([f"run_dir={run}", "stage=adapt", f"init={runs['pre']}", "adapter=lora",
                  "data=folder", f"data.root={runs['target']}", "train.max_steps=8",
                  "train.lr=1e-2", "train.resume=true", *MICRO]) == 0

    def key(recs):
        return [(r["step"], r["split"], r["loss"]) for r in recs if r["split"] != "corpus"]
    assert key(records(run)) == key(records(src))


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_adapt_bad_input(runs, tmp_path: Path, capsys) -> None:
    common = ["stage=adapt", "data=folder", f"data.root={runs['target']}", *MICRO]
    out = tmp_path / "r"
    assert train([f"run_dir={out}", *common]) == 2
    assert "stage=adapt needs init=" in one_line(capsys)
    assert train([f"run_dir={out}", f"init={tmp_path / 'nope'}", *common]) == 2
    assert "checkpoint not found" in one_line(capsys)
    assert train([f"run_dir={out}", f"init={runs['lora']}", *common]) == 2
    assert "is itself an adapter" in one_line(capsys)
    other = tmp_path / "other"
    shutil.copytree(runs["pre"] / "checkpoints" / "step_0000008", other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "branch": "moonbeam_lora"}))
    assert train([f"run_dir={out}", f"init={other}", *common]) == 2
    assert "is a 'moonbeam_lora' checkpoint" in one_line(capsys)
    assert train([f"run_dir={out}", f"init={runs['pre']}",
                  "+branch.tokenizer.config.num_velocity_bins=16", *common]) == 2
    assert "differs from the tokenizer of init" in one_line(capsys)
    assert train([f"run_dir={out}", f"init={runs['pre']}", "adapter.r=0", *common]) == 2
    assert "r > 0" in one_line(capsys)
    assert train([f"run_dir={out}", f"init={runs['pre']}", "adapter.targets=[q_proj,v_prj]",
                  *common]) == 2
    assert "'v_prj' is not a module of MusicTransformer" in one_line(capsys)
    assert train([f"run_dir={out}", *common, "stage=finetune"]) == 2
    assert "unknown stage" in one_line(capsys)
    assert not out.exists()


def test_qlora_without_bitsandbytes_is_a_clear_error(runs, tmp_path, monkeypatch,
                                                     capsys) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    out = tmp_path / "q"
    assert train([f"run_dir={out}", "stage=adapt", f"init={runs['pre']}", "adapter=qlora",
                  "data=folder", f"data.root={runs['target']}", *MICRO]) == 2
    assert "adapter=qlora needs bitsandbytes" in one_line(capsys)
    assert not out.exists()


def test_changed_base_is_refused_unless_forced(runs, tmp_path: Path, capsys) -> None:
    # An adapter trained on a copy of the base, whose weights then change on disk.
    base = tmp_path / "base_copy"
    shutil.copytree(runs["pre"] / "checkpoints" / "step_0000008", base)
    run = tmp_path / "ad"
    assert train([f"run_dir={run}", "stage=adapt", f"init={base}", "data=folder",
                  f"data.root={runs['target']}", "train.max_steps=2", *MICRO]) == 0
    from safetensors.torch import load_file, save_file

    state = load_file(str(base / "model.safetensors"))
    state["lm_head.weight"] = state["lm_head.weight"] * 1.01
    save_file(state, str(base / "model.safetensors"))
    out = tmp_path / "x.mid"
    assert generate([f"ckpt={run}", f"out={out}", "seconds=1"]) == 2
    assert "changed since adapter" in one_line(capsys) and not out.exists()
    assert generate([f"ckpt={run}", f"out={out}", "seconds=1", "force=true"]) == 0
    assert "WARNING" in capsys.readouterr().err and out.is_file()


def test_adapt_refuses_val_test_pieces_the_base_trained_on(runs, capsys) -> None:
    tmp = runs["tmp"]
    ckpt = runs["pre"] / "checkpoints" / "step_0000008"
    assert (ckpt / "splits.json").is_file()  # the manifest travels with the weights
    rule = json.loads((runs["lora"] / "splits.json").read_text())["rule"]
    assert rule["base_manifest"] == str(ckpt / "splits.json")
    # a manifest that puts the base's training albums in test
    leaky = json.loads((runs["pre"] / "splits.json").read_text())
    leaky["train"], leaky["test"] = leaky["test"], leaky["train"]
    (tmp / "leaky.json").write_text(json.dumps(leaky))
    run = tmp / "leak"
    assert train([f"run_dir={run}", "stage=adapt", f"init={runs['pre']}", "data=folder",
                  f"data.root={runs['data']}", f"split.manifest={tmp / 'leaky.json'}",
                  "train.max_steps=2", *MICRO]) == 2
    err = capsys.readouterr().err
    assert "were in the training data of" in err and "force=true" in err
    assert not (run / "metrics.jsonl").exists()
    # without a manifest, adapting on the base's own data reuses the base's splits: no leak
    same = tmp / "same"
    assert train([f"run_dir={same}", "stage=adapt", f"init={runs['pre']}", "data=folder",
                  f"data.root={runs['data']}", "train.max_steps=2", "report_base_loss=false",
                  *MICRO]) == 0
    a = json.loads((runs["pre"] / "splits.json").read_text())
    b = json.loads((same / "splits.json").read_text())
    assert all(a[s]["groups"] == b[s]["groups"] for s in ("train", "val", "test"))


def pijama_tree(root: Path) -> Path:
    """A PiJAMA-shaped catalogue, pijama.csv and its MIDI: Mehldau and Evans with three
    albums each (so each has one in train, val and test), two pianists with one."""
    rows = []
    for artist, albums in (("Brad Mehldau", 3), ("Bill Evans", 3), ("Kirk Lightsey", 1),
                           ("Dick Hyman", 1)):
        for a in range(albums):
            for t in range(2):
                rel = f"data/midi/studio/{artist}/{artist.split()[1]} {a}/tune {t}.midi"
                write_midi(root / rel, scale_notes(64, base=50 + 3 * a + t, step=0.2,
                                                   seed=len(rows)))
                rows.append({"id": str(len(rows)), "artist": artist,
                             "album": f"{artist.split()[1]} {a}", "title": f"Tune {t}",
                             "midi_filepath": rel})
    with open(root / "pijama.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=PIJAMA_HEADER, restval="")
        w.writeheader()
        w.writerows(rows)
    return root


def test_a_merged_chain_is_checked_against_every_ancestor(tmp_path: Path, capsys) -> None:
    # pretrain(all) -> adapt(Mehldau) -> merge -> adapt(Evans): the last stage's val/test
    # must not hold what the first stage trained on, though the merged checkpoint's own
    # manifest (the Mehldau adapter's) never lists an Evans album
    root = pijama_tree(tmp_path / "pijama")
    pijama = ["data=pijama", f"data.root={root}", "train.max_steps=1", "report_base_loss=false",
              *MICRO]
    pre, ada, merged = tmp_path / "pre", tmp_path / "ada", tmp_path / "merged"
    assert train([f"run_dir={pre}", "data.pianist=null", *pijama]) == 0
    assert train([f"run_dir={ada}", "stage=adapt", f"init={pre}", *pijama]) == 0
    assert merge([f"ckpt={ada}", f"out={merged}"]) == 0
    shutil.rmtree(ada)  # the merged checkpoint carries the lineage itself
    pre_ckpt = pre / "checkpoints" / "step_0000001"
    assert lineage_manifests(merged)[1] == (str(pre_ckpt), read_manifest(pre / "splits.json"))
    capsys.readouterr()
    # 1. by group: a manifest that puts the first stage's training albums in test
    leaky = json.loads((pre / "splits.json").read_text())
    leaky["train"], leaky["test"] = leaky["test"], leaky["train"]
    (tmp_path / "leaky.json").write_text(json.dumps(leaky))
    evans = ["stage=adapt", f"init={merged}", "data.pianist=Bill Evans",
             f"split.manifest={tmp_path / 'leaky.json'}", *pijama]
    assert train([f"run_dir={tmp_path / 'e'}", *evans]) == 2
    line = one_line(capsys)
    assert f"in the training data of {pre_ckpt} (the base's base)" in line
    assert "Bill Evans / Evans" in line and not (tmp_path / "e").exists()
    assert train([f"run_dir={tmp_path / 'e'}", "force=true", *evans]) == 0
    assert "(the base's base)" in capsys.readouterr().err
    lineage = json.loads((tmp_path / "e" / "checkpoints" / "step_0000001" / "lineage.json")
                         .read_text())["ancestors"]
    assert [a["checkpoint"] for a in lineage] == [str(merged), str(pre_ckpt)]
    # 2. by content: byte copies, under new names, of files the first stage trained on and
    # the Mehldau adapter did not; twice each, so the folder is one stratum of 3 files or
    # more, which deals some to val and test
    trained = [e for e in read_manifest(pre / "splits.json")["train"]["pieces"]
               if not e["group"].startswith("Brad Mehldau")]
    copies = tmp_path / "copies" / "found"
    copies.mkdir(parents=True)
    for i, entry in enumerate(trained * 2):
        shutil.copyfile(entry["path"], copies / f"take {i}.mid")
    assert len(trained) >= 2
    assert train([f"run_dir={tmp_path / 'c'}", "stage=adapt", f"init={merged}", "data=folder",
                  f"data.root={copies.parent}", "data.group_by=file", "train.max_steps=1",
                  *MICRO]) == 2
    assert f"in the training data of {pre_ckpt} (the base's base)" in one_line(capsys)
