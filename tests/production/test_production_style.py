"""Pianist (style) conditioning: a style token before every sequence, chosen at generation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MICRO, make_folder

from mehldau.branches.production.recipe import load_model
from mehldau.cli.generate import main as generate
from mehldau.cli.train import main as train
from mehldau.constants import IGNORE_INDEX
from mehldau.data.dataset import RandomCropDataset, WindowDataset
from mehldau.tokenize import build_tokenizer
from mehldau.train.checkpoint import latest_checkpoint


@pytest.fixture(scope="module")
def styled(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("style")
    data = make_folder(base / "data")
    run = base / "run"
    assert train([f"run_dir={run}", "data=folder", f"data.root={data}", "train.max_steps=8",
                  "style.enabled=true", *MICRO]) == 0
    return run


def folders(run: Path) -> list[str]:
    """The album folders the styled run trained on: its styles, sorted."""
    return sorted(d.name for d in (run.parent / "data").iterdir())


def test_style_ids_extend_the_vocabulary_and_decode_to_nothing() -> None:
    tok = build_tokenizer("performance", {"styles": ["Bill Evans", "Brad Mehldau"]})
    assert tok.vocab_size == 313 and tok.style_id("Brad Mehldau") == 312
    assert tok.decode(np.array([312, 1, 3 + 39, 179 + 50, 91 + 39])).note_num() == 1
    with pytest.raises(Exception, match="known styles: Bill Evans, Brad Mehldau"):
        tok.style_id("Keith Jarrett")


def test_every_window_starts_with_its_style_and_never_targets_after_it() -> None:
    tok = build_tokenizer("performance", {"styles": ["a", "b"]})
    seqs = [np.arange(3, 200, dtype=np.int64) % 270 + 3, np.arange(3, 90, dtype=np.int64)]
    prefixes = [np.array([311]), np.array([312])]
    crops = RandomCropDataset(seqs, 32, tok, seed=0, prefixes=prefixes)
    for i in range(20):
        item = crops[i]
        assert int(item["input_ids"][0]) in (311, 312)
        assert int(item["labels"][0]) == IGNORE_INDEX
    windows = WindowDataset(seqs, 16, 0, prefixes)
    targets = [t for i in range(len(windows)) for t in windows[i]["labels"].tolist()
               if t != IGNORE_INDEX]
    assert sorted(targets) == sorted(t for s in seqs for t in s[1:].tolist())


def test_style_token_changes_the_logits(styled: Path) -> None:
    ckpt = latest_checkpoint(styled)
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    assert tok["config"]["styles"] == folders(styled) and len(folders(styled)) == 4
    model, tokenizer = load_model(ckpt)
    ids = [tokenizer.style_id(s) for s in (folders(styled)[0], folders(styled)[-1])]
    x = torch.tensor([[ids[0], 1, 100, 200], [ids[1], 1, 100, 200]])
    with torch.no_grad():
        logits = model(x).logits
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)


def test_generate_needs_a_known_style(styled: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "s.mid"
    assert generate([f"ckpt={styled}", f"out={out}", "seconds=2"]) == 2
    assert f"add style=NAME, one of: {', '.join(folders(styled))}" in capsys.readouterr().err
    assert generate([f"ckpt={styled}", f"out={out}", "seconds=2", "style=nope"]) == 2
    assert "unknown style 'nope'" in capsys.readouterr().err
    assert not out.exists()
    assert generate([f"ckpt={styled}", f"out={out}", "seconds=2",
                     f"style={folders(styled)[2]}"]) == 0
    assert out.is_file()


def test_adapting_a_styled_base_to_one_style(styled: Path, tmp_path: Path, capsys) -> None:
    data = make_folder(tmp_path / "new")
    args = ["stage=adapt", f"init={styled}", "data=folder", f"data.root={data}",
            "train.max_steps=2", *MICRO]
    assert train([f"run_dir={tmp_path / 'bad'}", *args, "style.name=Keith Jarrett"]) == 2
    assert "unknown style 'Keith Jarrett'" in capsys.readouterr().err
    assert train([f"run_dir={tmp_path / 'ok'}", *args, "style.name=set 1"]) == 0


def test_style_on_an_unstyled_base_is_refused(tmp_path: Path, capsys) -> None:
    data = make_folder(tmp_path / "d")
    assert train([f"run_dir={tmp_path / 'plain'}", "data=folder", f"data.root={data}",
                  "train.max_steps=2", *MICRO]) == 0
    assert generate([f"ckpt={tmp_path / 'plain'}", f"out={tmp_path / 'x.mid'}",
                     "style=set 1"]) == 2
    assert "trained without style conditioning" in capsys.readouterr().err
