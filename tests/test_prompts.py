"""Prompts are cut one way: `notes.cut_prompt`, for mehldau-generate and mehldau-compare alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import symusic
from conftest import write_midi
from omegaconf import OmegaConf

from mehldau.evaluation.compare import write_prompts
from mehldau.recipes.autoregressive import prompt_tokens
from mehldau.tokenize.base import build_tokenizer
from mehldau.tokenize.notes import cut_prompt, score_notes

# A note whose key is up at 4.0 s but whose pedal (3.0-6.0 s) holds it past the cut at 5 s;
# a note struck after the cut; a note held by its key across the cut.
NOTES = [(60, 0.0, 1.0, 80), (64, 3.5, 0.5, 70), (67, 4.5, 1.5, 90), (72, 5.5, 0.5, 60)]
PEDALS = [(3.0, 3.0)]


@pytest.fixture
def piece(tmp_path: Path) -> Path:
    return write_midi(tmp_path / "piece.mid", NOTES, pedals=PEDALS)


def _ends(score: symusic.Score) -> dict[int, float]:
    start, end, pitch, _ = score_notes(score)
    return {int(p): round(float(e), 3) for p, e in zip(pitch, end)}


def test_a_pedal_held_across_the_cut_is_lifted_at_the_cut(piece: Path) -> None:
    whole = symusic.Score(str(piece))
    assert _ends(whole)[64] == 6.0  # the pedal holds it to 6 s in the performance
    cut = cut_prompt(whole, 5.0)
    ends = _ends(cut)
    assert 72 not in ends  # struck after the cut
    assert ends[64] == 5.0  # the pedal is lifted at the cut, not held to the excerpt's end
    assert ends[67] == 6.0  # the key is held across the cut: the note is whole, as played
    assert ends[60] == 1.0


def test_cutting_a_cut_prompt_again_changes_nothing(piece: Path, tmp_path: Path) -> None:
    once = cut_prompt(symusic.Score(str(piece)), 5.0)
    path = tmp_path / "once.mid"
    once.to("tick").dump_midi(str(path))
    twice = cut_prompt(symusic.Score(str(path)), 5.0)
    assert _ends(twice) == _ends(once)


@pytest.mark.parametrize("name", ["duration", "performance"])
def test_generate_reads_compares_prompt_file_as_it_reads_the_piece(piece: Path, tmp_path: Path,
                                                                   name: str) -> None:
    """The prompt mehldau-compare writes and the piece it was cut from give the same tokens."""
    cfg = OmegaConf.create({"prompt_seconds": 5.0, "max_prompts": 1, "seconds": 10.0})
    prompts = write_prompts([("piece", piece)], cfg, tmp_path / "prompts")
    tok = build_tokenizer(name, {})
    direct = prompt_tokens(tok, piece, 5.0)
    via_file = prompt_tokens(tok, prompts[0]["path"], 5.0)
    assert np.array_equal(direct, via_file)
    notes = tok.decode(direct)
    start, end, pitch, _ = score_notes(notes)
    assert 72 not in pitch.tolist()
    assert float(end[pitch == 64][0]) <= 5.0 + 1e-6  # never held to the end by the pedal
