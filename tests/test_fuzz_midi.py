"""Corrupt MIDI at volume: whatever bytes a folder holds, building a corpus with any of the
tokenizers never crashes, every file is either kept or listed in skipped.tsv with a reason,
and the good files are all kept (`benchmarks/fuzz_midi.py` runs 10,000 of these)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mehldau.data.corpus import build_corpus
from mehldau.data.fuzz import KINDS, corrupt, valid_midi
from mehldau.data.sources import folder_source
from mehldau.tokenize.base import build_tokenizer

TOKENIZERS = ("performance", "duration", "moonbeam", "pianoroll")
GOOD = 3  # one per split's worth of groups, so every split has a piece


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.lists(st.tuples(st.sampled_from(sorted(KINDS)), st.integers(0, 2**16)),
                    min_size=1, max_size=12))
def test_a_corrupt_folder_is_sorted_never_fatal(tokenizer: str, bad: list[tuple[str, int]],
                                               tmp_path: Path) -> None:
    root = tmp_path / "midi"
    shutil.rmtree(root, ignore_errors=True)  # hypothesis reuses tmp_path across examples
    root.mkdir(parents=True)
    good = {f"good_{i}.mid" for i in range(GOOD)}
    for i, name in enumerate(sorted(good)):
        (root / name).write_bytes(valid_midi(seed=i))
    for i, (kind, seed) in enumerate(bad):
        (root / f"bad_{i:02d}_{kind}.mid").write_bytes(corrupt(kind, seed))
    pieces = folder_source(root, group_by="file")
    run = tmp_path / "run"
    corpus = build_corpus(pieces, build_tokenizer(tokenizer, {}), run, tmp_path / "cache")

    kept = {p.path.name for s in corpus.splits.values() for p, _ in s}
    with open(run / "skipped.tsv") as f:
        skipped = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(f, delimiter="\t")}
    assert good <= kept  # every good file kept
    assert kept.isdisjoint(skipped) and kept | set(skipped) == {p.path.name for p in pieces}
    assert all(reason.strip() for reason in skipped.values())
    # files no reader can take are always among the skipped
    hopeless = {f"bad_{i:02d}_{k}.mid" for i, (k, _) in enumerate(bad)
                if k in ("random_bytes", "zero_division", "huge_delta", "pitch_past_127")}
    assert hopeless <= set(skipped)


def test_every_kind_yields_bytes_and_is_seeded() -> None:
    for kind in KINDS:
        assert corrupt(kind, 3) == corrupt(kind, 3)
    assert len({corrupt("flipped_bytes", s) for s in range(5)}) > 1
