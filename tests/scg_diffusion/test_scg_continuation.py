"""scg_diffusion continues a prompt (inpainting) and writes past its window (stitching);
mehldau-generate refuses a setting the branch would ignore."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import symusic
from conftest import SCG_MICRO as MICRO
from conftest import make_folder, write_midi

from mehldau.cli.generate import main as generate
from mehldau.cli.train import main as train
from mehldau.data.corpus import read_score
from mehldau.tokenize.notes import cut_prompt

pytestmark = pytest.mark.usefixtures("one_thread")
WINDOW = 2.56  # MICRO's model.frames=256 at 100 fps
# An autoencoder trained long enough to decode notes; the untrained DiT's latents are faint,
# so the decode repairs that drop quiet and short notes are turned off.
LOUD = ["sampler.steps=3", "decode.min_note_peak=0", "decode.min_note_frames=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scg_prompt")
    data = make_folder(root / "data")
    common = ["data=folder", f"data.root={data}", f"cache_dir={root / 'cache'}", *MICRO]
    assert train([f"run_dir={root / 'ae'}", "stage=autoencoder", *common, "train.lr=1e-2",
                  "train.max_steps=40", "train.eval_every=40", "train.ckpt_every=40"]) == 0
    assert train([f"run_dir={root / 'dit'}", "stage=diffusion", f"init={root / 'ae'}",
                  *common]) == 0
    return {"dit": root / "dit", "prompt": sorted(data.rglob("*.mid"))[0]}


def _notes(score: symusic.Score) -> list[tuple]:
    secs = score.to("second")
    return sorted((round(n.time, 4), n.pitch, round(n.duration, 4), n.velocity)
                  for t in secs.tracks for n in t.notes)


def test_a_prompt_is_continued_after_its_cut(run, tmp_path: Path) -> None:
    out = tmp_path / "c.mid"
    assert generate([f"ckpt={run['dit']}", "branch=scg_diffusion", f"prompt={run['prompt']}",
                     "prompt_seconds=5", "seconds=3", f"out={out}", "seed=1", *LOUD]) == 0
    got = _notes(symusic.Score(str(out)))
    want = _notes(cut_prompt(read_score(run["prompt"]), 5.0))
    assert want and [n for n in got if n[0] < 5] == want  # the prompt's notes, exactly
    after = [n for n in got if n[0] >= 5]
    assert after and max(n[0] for n in after) < 5 + 3 + WINDOW


def test_seconds_longer_than_a_window_are_stitched(run, tmp_path: Path) -> None:
    out = tmp_path / "long.mid"
    assert generate([f"ckpt={run['dit']}", f"prompt={run['prompt']}", "prompt_seconds=1",
                     "seconds=5", f"out={out}", f"rules.reference={run['prompt']}",
                     "rules.use=[note_density]", "scg.candidates=2", *LOUD]) == 0
    starts = [n[0] for n in _notes(symusic.Score(str(out)))]
    assert max(starts) > WINDOW + 1  # the music goes on past the model's one window
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["windows"] >= 3  # 6 s in windows of 2.56 s that overlap by half


@pytest.mark.parametrize("arg", ["top_k=5", "temperature=0.8", "top_p=0.9", "max_tokens=100",
                                 "style=Someone", "use_cache=false", "max_note_seconds=2"])
def test_a_setting_scg_does_not_use_is_refused(run, tmp_path: Path, capsys, arg: str) -> None:
    out = tmp_path / "x.mid"
    assert generate([f"ckpt={run['dit']}", f"out={out}", arg]) == 2
    err = capsys.readouterr().err.strip()
    key = arg.split("=")[0]
    assert f"scg_diffusion does not use {key}; drop it (it uses: " in err, err
    assert err.count("\n") == 0 and not out.exists()


def test_settings_left_at_their_defaults_are_not_refused(run, tmp_path: Path) -> None:
    # given on the command line but equal to configs/generate.yaml's: nothing is ignored
    assert generate([f"ckpt={run['dit']}", f"out={tmp_path / 'd.mid'}", "top_k=0",
                     "temperature=1.0", "sampler.steps=2"]) == 0


def test_the_output_is_the_prompt_then_the_models_notes_from_the_cut(tmp_path: Path) -> None:
    """Decoded notes over the prompt are its reconstruction: dropped for the prompt itself,
    whose notes (sounding past the cut, pedal lifted there) are kept whole."""
    from mehldau.branches.scg_diffusion.recipe import _continued

    path = write_midi(tmp_path / "p.mid", [(60, 0.0, 1.0, 80), (64, 1.5, 3.0, 70),
                                           (67, 2.5, 1.0, 90)])
    cut = cut_prompt(read_score(path), 2.0)
    decoded = symusic.Score(480)
    track = symusic.Track("piano", 0, False)
    for start, pitch in ((0.5, 50), (1.9, 52), (2.0, 55), (3.2, 57)):  # ticks at 120 bpm
        track.notes.append(symusic.Note(int(start * 960), 240, pitch, 64))
    decoded.tracks.append(track)
    got = _notes(_continued(cut, decoded, 2.0))
    assert [n[:3] for n in got] == [(0.0, 60, 1.0), (1.5, 64, 3.0), (2.0, 55, 0.25),
                                    (3.2, 57, 0.25)]
