"""Splits that hold across runs: a function of the whole catalogue, frozen by a manifest,
checked against a base's training data when adapting."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import scale_notes, write_midi
from test_data import PIJAMA_HEADER

from mehldau.data.corpus import BadMidi, build_corpus, file_hash
from mehldau.data.sources import folder_source, pijama_source
from mehldau.data.splits import (
    SPLITS,
    assign_splits,
    check_leaks,
    read_manifest,
    splits_for_run,
    write_manifest,
)
from mehldau.errors import UserError
from mehldau.tokenize import build_tokenizer

STANDARDS = ["All The Things You Are", "Body And Soul", "Stella By Starlight", "Nardis",
             "Blackbird", "Exit Music", "Solar", "My Favorite Things"]


def catalogue_rows(seed: int = 0) -> list[dict[str, str]]:
    """A PiJAMA-shaped catalogue: 25 pianists with 1-8 albums each, Mehldau with 5; titles
    drawn from a few standards so the same tune is on several albums."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, str]] = []
    pianists = [("Brad Mehldau", 5)] + [(f"Pianist {i:02d}", int(rng.integers(1, 9)))
                                         for i in range(24)]
    for artist, n_albums in pianists:
        for a in range(n_albums):
            album = f"{artist.split()[-1]} Album {a}"
            for t in range(int(rng.integers(3, 15))):
                title = STANDARDS[int(rng.integers(len(STANDARDS)))] if t % 2 else f"Orig {t}"
                rows.append({"id": str(len(rows)), "artist": artist, "album": album,
                             "title": title, "recording_condition": "live",
                             "midi_filepath": f"data/midi/live/{artist}/{album}/{t}.midi"})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=PIJAMA_HEADER)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in PIJAMA_HEADER})
    return path


def split_groups(pieces) -> dict[str, set[str]]:
    return {s: {p.group for p in pieces if p.split == s} for s in SPLITS}


def check_catalogue(csv_path: Path, root: Path) -> None:
    everyone = pijama_source(root, csv_path, pianist=None)
    mehldau = pijama_source(root, csv_path, pianist="Brad Mehldau")
    pre, ada = split_groups(everyone), split_groups(mehldau)
    # the README's workflow: pretrain on everyone, adapt on Mehldau; no album crosses
    assert not pre["train"] & (ada["val"] | ada["test"])
    assert not ada["train"] & (pre["val"] | pre["test"])
    split_of = {p.id: p.split for p in everyone}
    assert all(split_of[p.id] == p.split for p in mehldau)
    # stratified: a pianist with >= 3 albums has val and test albums
    albums: dict[str, dict[str, set[str]]] = {}
    for p in everyone:
        albums.setdefault(p.style, {s: set() for s in SPLITS})[p.split].add(p.group)
    for artist, by in albums.items():
        if sum(len(g) for g in by.values()) >= 3:
            assert by["val"] and by["test"], artist
    assert len({p.group for p in mehldau if p.split == "train"}) == 3  # of 5 albums


def test_catalogue_split_pretrain_all_vs_adapt_mehldau(tmp_path: Path) -> None:
    check_catalogue(write_csv(tmp_path / "pijama.csv", catalogue_rows()), tmp_path)


@pytest.mark.skipif(not os.environ.get("MEHLDAU_PIJAMA_CSV"),
                    reason="set MEHLDAU_PIJAMA_CSV to PiJAMA's pijama.csv")
def test_real_catalogue_pretrain_all_vs_adapt_mehldau(tmp_path: Path) -> None:
    check_catalogue(Path(os.environ["MEHLDAU_PIJAMA_CSV"]), tmp_path)


def test_a_new_pianist_moves_no_one_else(tmp_path: Path) -> None:
    rows = catalogue_rows()
    a = pijama_source(tmp_path, write_csv(tmp_path / "a.csv", rows), pianist=None)
    more = rows + [{**r, "id": str(10_000 + i), "artist": "Newcomer",
                    "album": f"New {i % 4}"} for i, r in enumerate(rows[:20])]
    b = pijama_source(tmp_path, write_csv(tmp_path / "b.csv", more), pianist=None)
    split_b = {p.id: p.split for p in b}
    big = {p.style for p in a if len({q.group for q in a if q.style == p.style}) >= 3}
    moved = [p.id for p in a if p.style in big and split_b[p.id] != p.split]
    assert not moved


def test_skipping_different_files_leaves_the_split_unchanged(tmp_path: Path) -> None:
    for i in range(12):
        write_midi(tmp_path / "data" / f"tune {i}.mid", scale_notes(4 if i % 4 == 3 else 16,
                                                                  seed=i))
    pieces = folder_source(tmp_path / "data", group_by="file")
    full = build_corpus(pieces, build_tokenizer("performance"), None, None)
    picky = build_tokenizer("performance")
    encode = picky.encode

    def fussy(score):  # a tokenizer that rejects files another accepts
        if score.note_num() < 10:
            raise BadMidi("too few notes for this tokenizer")
        return encode(score)

    picky.encode = fussy
    partial = build_corpus(pieces, picky, None, None)
    a = {p.id: s for s, pairs in full.splits.items() for p, _ in pairs}
    b = {p.id: s for s, pairs in partial.splits.items() for p, _ in pairs}
    assert len(a) == 12 and len(b) == 9 and len(partial.skipped) == 3
    assert all(a[i] == s for i, s in b.items())


def test_manifest_freezes_splits_and_lists_shared_titles(tmp_path: Path) -> None:
    rows = catalogue_rows()
    pieces = pijama_source(tmp_path, write_csv(tmp_path / "p.csv", rows), pianist=None)
    manifest = write_manifest(pieces, tmp_path / "splits.json", {"seed": 0})
    titles = manifest["titles_in_several_splits"]
    assert "allthethingsyouare" in titles and len(titles["allthethingsyouare"]) > 1
    # another seed gives other splits; the manifest brings the first ones back
    other = assign_splits(pieces, seed=9)
    assert [p.split for p in other] != [p.split for p in pieces]
    frozen, rule = splits_for_run(other, tmp_path / "splits.json")
    assert [p.split for p in frozen] == [p.split for p in pieces]
    assert rule["manifest"].endswith("splits.json")
    with pytest.raises(UserError, match="not a split manifest"):
        (tmp_path / "bad.json").write_text(json.dumps({"train": []}))
        read_manifest(tmp_path / "bad.json")
    with pytest.raises(UserError, match="split manifest .*No such file"):
        read_manifest(tmp_path / "nope.json")


def test_check_leaks_by_group_and_by_content(tmp_path: Path) -> None:
    for i in range(9):
        write_midi(tmp_path / "a" / f"album {i}" / "t.mid", scale_notes(8, seed=i))
    pieces = folder_source(tmp_path / "a")
    base = write_manifest(pieces, tmp_path / "splits.json", hashes={
        p.id: file_hash(p.path) for p in pieces})
    check_leaks(pieces, base, "base")  # its own splits: fine
    moved = assign_splits(pieces, seed=3)
    assert any(p.split != q.split for p, q in zip(moved, pieces))
    with pytest.raises(UserError, match=r"val/test pieces were in the training data of base"):
        check_leaks(moved, base, "base", hash_of=file_hash)
    check_leaks(moved, base, "base", force=True)  # warns only
    # the same files copied under other names and groups: caught by content
    for i in range(9):
        write_midi(tmp_path / "b" / f"disc {i}.mid", scale_notes(8, seed=i))
    copies = folder_source(tmp_path / "b", group_by="file")
    check_leaks(copies, base, "base")  # no hashes asked: groups differ, not caught
    with pytest.raises(UserError, match="force=true"):
        check_leaks(copies, base, "base", hash_of=file_hash)


def test_manifest_paths_are_absolute(tmp_path: Path, monkeypatch) -> None:
    # compare reads the reference from the manifest, maybe from another working directory
    write_midi(tmp_path / "data" / "a.mid", scale_notes(8))
    monkeypatch.chdir(tmp_path)
    pieces = folder_source("data", group_by="file")
    manifest = write_manifest(pieces, tmp_path / "splits.json")
    paths = [Path(e["path"]) for s in SPLITS for e in manifest[s]["pieces"]]
    assert paths and all(p.is_absolute() and p.is_file() for p in paths)
