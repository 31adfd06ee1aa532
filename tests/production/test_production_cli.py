"""The production branch end to end through the CLI: train, resume, generate, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pretty_midi
import pytest
import symusic
import torch
from conftest import MICRO, make_folder, write_midi

from mehldau.cli.generate import main as generate
from mehldau.cli.train import main as train


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("e2e")
    data = make_folder(base / "data")
    run = base / "run"
    rc = train([f"run_dir={run}", "data=folder", f"data.root={data}", "train.max_steps=8",
                *MICRO])
    assert rc == 0
    return run


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert "error:" in err
    return err


def test_train_writes_run_directory(trained: Path) -> None:
    recs = [json.loads(ln) for ln in (trained / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["split"] == "corpus" and recs[0]["unigram_entropy"] > 0
    assert [r["step"] for r in recs if r["split"] == "val"] == [4, 8]
    assert all({"loss", "tokens_per_s"} <= set(r) for r in recs if r["split"] == "train")
    ckpt = trained / "checkpoints" / "step_0000008"
    for name in ("model.safetensors", "config.yaml", "tokenizer.json", "meta.json",
                 "model_config.json", "trainer_state.pt"):
        assert (ckpt / name).is_file(), name
    assert (trained / "splits.json").is_file() and (trained / "skipped.tsv").is_file()
    assert not list((trained / "checkpoints").glob(".*tmp*"))


def test_resume_reproduces_the_uninterrupted_run(trained: Path, tmp_path: Path) -> None:
    # Simulate a run stopped right after its step-4 checkpoint, then resumed.
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(trained / "checkpoints" / "step_0000004", run / "checkpoints" / "step_0000004")
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(ln for ln in lines
                                                 if json.loads(ln)["step"] <= 5) + "\n")
    data = trained.parent / "data"  # the same data folder as the original run
    assert train([f"run_dir={run}", "data=folder", f"data.root={data}", "train.max_steps=8",
                  "train.resume=true", *MICRO]) == 0
    a = [json.loads(ln) for ln in (trained / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    key = [(r["step"], r["split"], r.get("loss")) for r in a if r["split"] in ("train", "val")]
    got = [(r["step"], r["split"], r.get("loss")) for r in b if r["split"] in ("train", "val")]
    assert got == key


class _Payload:
    """Unpickling this runs a shell command: what a malicious trainer_state.pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_trainer_state_that_would_run_code(trained: Path, tmp_path: Path,
                                                            capsys) -> None:
    run = tmp_path / "planted"
    shutil.copytree(trained / "checkpoints" / "step_0000004", run / "checkpoints" / "step_0000004")
    marker = tmp_path / "pwned"
    torch.save({"step": 4, "optimizer": _Payload(marker)},
               run / "checkpoints" / "step_0000004" / "trainer_state.pt")
    data = trained.parent / "data"
    assert train([f"run_dir={run}", "data=folder", f"data.root={data}", "train.max_steps=8",
                  "train.resume=true", *MICRO]) == 2
    assert "refusing to load it" in one_line_error(capsys)
    assert not marker.exists()


def test_generate_writes_piano_midi(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.mid"
    assert generate([f"ckpt={trained}", f"out={out}", "seconds=20", "seed=1"]) == 0
    pm = pretty_midi.PrettyMIDI(str(out))
    assert pm.instruments and all(i.program == 0 for i in pm.instruments)
    assert sum(len(i.notes) for i in pm.instruments) > 0


def test_generate_render_draws_and_renders_beside_the_midi(trained: Path, tmp_path: Path,
                                                            capsys) -> None:
    """What make demo writes: the piano roll always, the audio where FluidSynth is here."""
    from mehldau.evaluation import sample_view as view

    out = tmp_path / "generated.mid"
    assert generate([f"ckpt={trained}", f"out={out}", "seconds=6", "render=true"]) == 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    if view.audio_available():
        wav = out.with_suffix(".wav")
        end = symusic.Score(str(out)).to("second").end()
        assert view.wav_seconds(wav) >= end and view.wav_level_dbfs(wav) > -60
    else:
        assert not out.with_suffix(".wav").exists()
        assert "apt-get install fluidsynth" in capsys.readouterr().err


@pytest.mark.parametrize("tokens", ["duration", "performance"])
def test_generate_caps_long_notes_and_counts_them(tokens: str, trained: Path, tmp_path: Path,
                                                 capsys) -> None:
    run = trained
    if tokens == "performance":  # note-on/off events: notes may be left open
        run = tmp_path / "perf"
        assert train([f"run_dir={run}", "data=folder", f"data.root={trained.parent / 'data'}",
                      "train.max_steps=4", "branch.tokenizer.name=performance", *MICRO]) == 0
    capsys.readouterr()
    args = [f"ckpt={run}", "seconds=20", "seed=1"]
    assert generate([*args, f"out={tmp_path / 'free.mid'}", "max_note_seconds=null"]) == 0
    capsys.readouterr()
    assert generate([*args, f"out={tmp_path / 'cap.mid'}", "max_note_seconds=0.5"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    free = pretty_midi.PrettyMIDI(str(tmp_path / "free.mid")).instruments[0].notes
    capped = pretty_midi.PrettyMIDI(str(tmp_path / "cap.mid")).instruments[0].notes
    assert capped and max(n.end - n.start for n in capped) <= 0.5 + 1e-3
    longer = sum(n.end - n.start > 0.5 + 1e-3 for n in free)
    assert longer > 0 and line.endswith(f", {longer} closed by the max_note_seconds cut")


def test_generate_num_samples_writes_one_file_each(trained: Path, tmp_path: Path) -> None:
    ckpt = trained / "checkpoints" / "step_0000004"  # a checkpoint dir works as well
    assert generate([f"ckpt={ckpt}", f"out={tmp_path / 's.mid'}", "seconds=2",
                     "num_samples=2", "top_k=20"]) == 0
    assert (tmp_path / "s_1.mid").is_file() and (tmp_path / "s_2.mid").is_file()


def test_generate_continues_the_prompt(trained: Path, tmp_path: Path) -> None:
    notes = [(60 + i % 7, 0.3 * i, 0.25, 70) for i in range(12)]
    prompt = write_midi(tmp_path / "prompt.mid", notes)
    out = tmp_path / "cont.mid"
    assert generate([f"ckpt={trained}", f"out={out}", f"prompt={prompt}", "prompt_seconds=2",
                     "seconds=2"]) == 0
    got = symusic.Score(str(out)).to("second").tracks[0].notes
    got = sorted((n.time, n.pitch) for n in got)[:7]  # notes starting before 2 s: i = 0..6
    want = sorted((0.3 * i, 60 + i % 7) for i in range(7))
    assert [p for _, p in got] == [p for _, p in want]
    assert all(abs(t1 - t2) <= 0.011 for (t1, _), (t2, _) in zip(got, want))
    # The prompt's notes are whole (duration tokens) and the continuation starts at the cut.
    notes = symusic.Score(str(out)).to("second").tracks[0].notes
    assert sorted(round(n.duration, 2) for n in notes if n.time < 2.0) == [0.25] * 7
    assert min(n.time for n in notes if n.time > 1.9) >= 2.0 - 1e-3


def test_stream_gives_the_notes_generate_writes_as_they_are_sampled(trained: Path,
                                                                    tmp_path: Path) -> None:
    """The iterator a page plays from: the same seed gives the notes of the written file
    (onset, pitch, velocity, and the end decided at the onset), each once, in onset order,
    none from the prompt; the first arrives after a few ids, not at the end."""
    import itertools

    from branches.production import recipe
    from mehldau.cli.common import compose
    from mehldau.sampling import KVCacheDecoder

    notes = [(60 + i % 7, 0.3 * i, 0.25, 70) for i in range(12)]
    prompt = write_midi(tmp_path / "prompt.mid", notes)
    args = [f"ckpt={trained}", f"prompt={prompt}", "prompt_seconds=2", "seconds=6",
            "num_samples=2", "max_note_seconds=null"]
    out = tmp_path / "take.mid"
    assert generate([*args, f"out={out}"]) == 0
    cfg = compose("generate", [*args, f"out={tmp_path / 'unused.mid'}"])
    ckpt = trained / "checkpoints" / "step_0000008"  # what the command resolves the run to
    streamed = list(recipe.stream(cfg, ckpt))
    assert not (tmp_path / "unused.mid").exists()
    assert len(streamed) >= 4
    for row in (0, 1):
        mine = [n for n in streamed if n.row == row]
        assert [n.start for n in mine] == sorted(n.start for n in mine)
        written = symusic.Score(str(out.with_name(f"take_{row + 1}.mid"))).to("second")
        want = sorted((round(n.time, 3), n.pitch, n.velocity) for n in written.tracks[0].notes
                      if n.time >= 2.0 - 1e-3)
        assert sorted((round(n.start, 3), n.pitch, n.velocity) for n in mine) == want
        ends = {(round(n.time, 3), n.pitch): n.time + n.duration
                for n in written.tracks[0].notes}
        # a note re-struck before its end is cut short in the file, never lengthened
        assert all(ends[(round(n.start, 3), n.pitch)] <= n.end + 1e-3 for n in mine)
    # lazily: the first note comes after a handful of ids, from a decoder stepped that far
    steps = []
    decode_step = KVCacheDecoder.step

    def counting(self, token):
        steps.append(1)
        return decode_step(self, token)

    KVCacheDecoder.step = counting
    try:
        first = next(itertools.islice(recipe.stream(cfg, ckpt), 1))
    finally:
        KVCacheDecoder.step = decode_step
    assert first.start >= 2.0 - 1e-3 and len(steps) < 40


# --- bad input: one line, exit 2, no traceback, nothing half-written -----------------------
@pytest.mark.parametrize("args, message", [
    (["branch=nope"], "unknown branch 'nope'"),
    (["model=huge"],
     "unknown model 'huge'; choose one of: base, judge_resnet18, judge_tiny, moonbeam_309m, "
     "moonbeam_839m, moonbeam_tiny, perceiver_base, perceiver_tiny, scg_base, scg_tiny, tiny"),
    (["data=folder"], "data.root is required"),
    (["data=folder", "data.root=/no/such/folder"], "data folder not found"),
    (["train.max_steps=0"], "train.max_steps must be positive"),
    (["model.max_seq_len=-8"], "max_seq_len must be positive"),
    (["no_such_key=1"], "unknown option 'no_such_key'"),
    (["augment.stretch_min=1.2", "augment.stretch_max=1.0"],
     "bad augment config: the stretch range must satisfy 0 < min <= max, got 1.2..1.0"),
    (["augment.transpose=-1"], "bad augment config: transpose must be >= 0 semitones"),
])
def test_train_bad_input(args, message, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert train([f"run_dir={run}", *args, "logger=none"]) == 2
    assert message in one_line_error(capsys)
    assert not run.exists()


def test_train_folder_without_midi_and_bad_pijama_csv(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    assert train([f"run_dir={tmp_path / 'r1'}", "data=folder", f"data.root={empty}"]) == 2
    assert "no .mid/.midi files" in one_line_error(capsys)
    csv = tmp_path / "meta.csv"
    csv.write_text("id,artist,title\n0,Brad Mehldau,x\n")
    assert train([f"run_dir={tmp_path / 'r2'}", "data=pijama", f"data.root={empty}",
                  f"data.csv={csv}"]) == 2
    assert "lacks PiJAMA columns" in one_line_error(capsys)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_train_refuses_to_overwrite_a_run(trained: Path, capsys) -> None:
    assert train([f"run_dir={trained}", "logger=none"]) == 2
    assert "train.resume=true" in one_line_error(capsys)


def _gen_error(args: list[str], capsys) -> str:
    assert generate(args) == 2
    return one_line_error(capsys)


def test_generate_bad_input(trained: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.mid"
    ok = [f"ckpt={trained}", f"out={out}"]
    assert "ckpt is required" in _gen_error([f"out={out}"], capsys)
    assert "checkpoint not found" in _gen_error([f"ckpt={tmp_path / 'nope'}", f"out={out}"],
                                                capsys)
    assert "seconds must be positive" in _gen_error([*ok, "seconds=-1"], capsys)
    assert "seconds must be positive" in _gen_error([*ok, "seconds=0"], capsys)
    assert "num_samples must be positive" in _gen_error([*ok, "num_samples=0"], capsys)
    assert "temperature must be positive" in _gen_error([*ok, "temperature=0"], capsys)
    assert "top_p must be" in _gen_error([*ok, "top_p=0"], capsys)
    assert "prompt" in _gen_error([*ok, f"prompt={tmp_path / 'missing.mid'}"], capsys)
    silent = write_midi(tmp_path / "silent.mid", [])
    assert "no notes" in _gen_error([*ok, f"prompt={silent}"], capsys)
    assert "unknown branch 'nope'" in _gen_error([*ok, "branch=nope"], capsys)
    assert not out.exists()


def test_generate_rejects_broken_checkpoints(trained: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.mid"
    src = trained / "checkpoints" / "step_0000008"
    no_weights = tmp_path / "no_weights"
    shutil.copytree(src, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert "no model.safetensors" in _gen_error([f"ckpt={no_weights}", f"out={out}"], capsys)

    other = tmp_path / "other_branch"
    shutil.copytree(src, other)
    meta = json.loads((other / "meta.json").read_text())
    # the branch named in meta.json picks the recipe (its "recipe" entry is never imported),
    # and that recipe refuses what it cannot use
    (other / "meta.json").write_text(json.dumps({**meta, "branch": "scg_diffusion",
                                                 "recipe": "mehldau.branches.production.recipe"}))
    assert "is the pretrain stage" in _gen_error([f"ckpt={other}", f"out={out}"], capsys)
    assert "from branch 'scg_diffusion', not 'production'" in _gen_error(
        [f"ckpt={other}", f"out={out}", "branch=production"], capsys)

    foreign = tmp_path / "foreign_weights"
    shutil.copytree(src, foreign)
    from safetensors.torch import load_file, save_file

    state = load_file(str(foreign / "model.safetensors"))
    save_file({"encoder." + k: v for k, v in state.items()}, str(foreign / "model.safetensors"))
    assert "lacks weight" in _gen_error([f"ckpt={foreign}", f"out={out}"], capsys)

    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    assert "no checkpoint in" in _gen_error([f"ckpt={empty_run}", f"out={out}"], capsys)
    assert not out.exists()


def test_help_and_cfg_print_and_exit_zero(capsys) -> None:
    assert train(["--help"]) == 0 and "usage: mehldau-train" in capsys.readouterr().out
    assert train(["--cfg", "model=base"]) == 0
    out = capsys.readouterr().out
    assert "n_layers: 6" in out and "name: production" in out
    assert generate(["--cfg", "ckpt=x", "out=y.mid"]) == 0
    assert "top_p: 1.0" in capsys.readouterr().out


def test_generate_refuses_the_settings_only_scg_uses(trained: Path, tmp_path: Path,
                                                      capsys) -> None:
    out = tmp_path / "s.mid"
    assert generate([f"ckpt={trained}", f"out={out}", "top_k=5", "seconds=2"]) == 0
    capsys.readouterr()
    for arg in ("rules.use=[chord]", "scg.candidates=3", "sampler.steps=5",
                "decode.min_note_peak=0"):
        err = _gen_error([f"ckpt={trained}", f"out={tmp_path / 'r.mid'}", arg], capsys)
        assert f"production does not use {arg.split('=')[0]}; drop it" in err, err
