"""Sources, group splits, validation with skip report, token cache, datasets."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import scale_notes, write_midi

from mehldau.constants import IGNORE_INDEX
from mehldau.data.corpus import build_corpus, tokenize_pieces, unigram_entropy
from mehldau.data.dataset import Augmentation, RandomCropDataset, WindowDataset, add_bos_eos
from mehldau.data.sources import PIJAMA_COLUMNS, Piece, folder_source, pijama_source
from mehldau.data.splits import split_by_group
from mehldau.errors import UserError
from mehldau.tokenize import build_tokenizer

# The header of PiJAMA's published pijama.csv, copied here so the tests need no data.
PIJAMA_HEADER = ("id,artist,album,title,recording_condition,midi_filepath,mp3_filepath,"
                 "youtube_url,duration_sec,performance_start_sec,performance_end_sec,split,"
                 "acoust_id,mb_album_id,mb_artist_id,mb_track_id,mb_recording_id,agreement,"
                 "discogs_idx").split(",")


def assert_no_group_crosses(splits: dict[str, list[Piece]]) -> None:
    seen: dict[str, str] = {}
    for name, pieces in splits.items():
        for p in pieces:
            assert seen.setdefault(p.group, name) == name, f"group {p.group} in two splits"


# --- folder ------------------------------------------------------------------------------
def test_folder_source_finds_every_case_and_groups_by_top_dir(midi_folder: Path) -> None:
    pieces = folder_source(midi_folder)
    ids = sorted(p.id for p in pieces)
    assert len(ids) == 8
    assert "Loose One.MID" in ids and "loose two.midi" in ids
    assert "album 0/tune 1 'take'.mid" in ids
    groups = {p.id: p.group for p in pieces}
    assert groups["album 1/tune 0 'take'.mid"] == groups["album 1/tune 1 'take'.mid"] \
        == f"{midi_folder.name}/album 1"
    assert groups["Loose One.MID"] != groups["loose two.midi"]  # loose files: own groups


def test_flat_folder_still_splits(tmp_path: Path) -> None:
    for i in range(10):
        write_midi(tmp_path / f"piece {i}.mid", scale_notes(8, seed=i))
    splits = split_by_group(folder_source(tmp_path), seed=1)
    assert all(splits[s] for s in ("train", "val", "test"))
    assert_no_group_crosses(splits)


def test_regex_grouping_keeps_versions_of_a_tune_together(tmp_path: Path) -> None:
    names = ["Spring Is Here.mid", "Spring Is Here 2.mid", "Spring is Here 2 (K Barron).mid",
             "Stella solo.mid", "Stella.mid", "Nardis.mid"]
    for n in names:
        write_midi(tmp_path / n, scale_notes(4))
    groups = {p.id: p.group for p in folder_source(tmp_path, group_by="regex")}
    assert groups["Spring Is Here.mid"] == groups["Spring Is Here 2.mid"] \
        == groups["Spring is Here 2 (K Barron).mid"]
    assert groups["Stella solo.mid"] == groups["Stella.mid"] != groups["Nardis.mid"]
    custom = {p.id: p.group for p in folder_source(tmp_path, "regex", r"^(\w+)")}
    assert custom["Stella.mid"] == f"{tmp_path.name}/stella"


def test_split_is_deterministic_and_by_group() -> None:
    pieces = [Piece(f"p{i}", Path(f"p{i}"), group=f"g{i % 13}") for i in range(100)]
    a = split_by_group(pieces, (0.8, 0.1, 0.1), seed=3)
    b = split_by_group(list(reversed(pieces)), (0.8, 0.1, 0.1), seed=3)
    ids = [{k: [p.id for p in v] for k, v in split.items()} for split in (a, b)]
    assert ids[0] == ids[1]
    assert_no_group_crosses(a)
    c = split_by_group(pieces, (0.8, 0.1, 0.1), seed=4)  # another seed, another hand
    assert {k: [p.id for p in v] for k, v in c.items()} != ids[0]
    assert 60 <= len(a["train"]) <= 90


def test_missing_or_empty_folder_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        folder_source(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("no midi here")
    with pytest.raises(UserError, match=r"no \.mid"):
        folder_source(tmp_path)


# --- PiJAMA ------------------------------------------------------------------------------
def write_pijama_csv(root: Path, rows: list[dict[str, str]]) -> None:
    """`root/pijama.csv` with the published header, `rows` filled in."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "pijama.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=PIJAMA_HEADER)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in PIJAMA_HEADER})


def _pijama_tree(tmp: Path, rows: list[dict[str, str]]) -> Path:
    root = tmp / "pijama"
    write_pijama_csv(root, rows)
    for i, r in enumerate(rows):
        write_midi(root / r["midi_filepath"], scale_notes(6, seed=i))
    return root


def _synthetic_rows() -> list[dict[str, str]]:
    rows = []
    rng = np.random.default_rng(0)
    for artist in ("Brad Mehldau", "Bill Evans", "Dick Hyman"):
        for a in range(6):
            album = f"Album {a} - Live"
            for t in range(int(rng.integers(2, 6))):
                cond = "live" if a % 2 else "studio"
                rows.append({
                    "id": str(len(rows)), "artist": artist, "album": album,
                    "title": f"Tune {t}", "recording_condition": cond,
                    "midi_filepath": f"data/midi/{cond}/{artist}/{album}/Tune {t}.midi",
                    # PiJAMA's own split is random per file: albums cross it. We must ignore it.
                    "split": ("train", "val", "test")[t % 3],
                })
    return rows


def test_pijama_source_groups_by_album_and_filters_pianist(tmp_path: Path) -> None:
    rows = _synthetic_rows()
    root = _pijama_tree(tmp_path, rows)
    pieces = pijama_source(root)  # CSV found in the root
    mehldau_rows = [r for r in rows if r["artist"] == "Brad Mehldau"]
    assert len(pieces) == len(mehldau_rows)
    assert all(p.path.is_file() for p in pieces)
    assert {p.group for p in pieces} == {f"Brad Mehldau / Album {a} - Live" for a in range(6)}
    splits = split_by_group(pieces, seed=0)
    assert_no_group_crosses(splits)
    assert all(splits[s] for s in splits)
    everyone = pijama_source(root, pianist=None)
    assert len(everyone) == len(rows)
    assert_no_group_crosses(split_by_group(everyone, seed=5))


def test_pijama_bad_csv_and_unknown_pianist(tmp_path: Path) -> None:
    root = _pijama_tree(tmp_path, _synthetic_rows())
    bad = tmp_path / "bad.csv"
    bad.write_text("id,artist,title\n1,x,y\n")
    with pytest.raises(UserError, match="lacks PiJAMA columns album, midi_filepath"):
        pijama_source(root, csv_path=bad)
    with pytest.raises(UserError, match="no PiJAMA rows for pianist"):
        pijama_source(root, pianist="Brad Meldau")


# The published metadata, when a developer points at it: MEHLDAU_PIJAMA_CSV=.../pijama.csv
REAL_CSV = os.environ.get("MEHLDAU_PIJAMA_CSV")


@pytest.mark.skipif(not REAL_CSV, reason="set MEHLDAU_PIJAMA_CSV to PiJAMA's pijama.csv")
def test_real_pijama_csv_mehldau_albums_never_cross(tmp_path: Path) -> None:
    with open(REAL_CSV, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["artist"] == "Brad Mehldau"]
    assert set(PIJAMA_COLUMNS) <= set(rows[0])
    root = _pijama_tree(tmp_path, rows)
    pieces = pijama_source(root)
    assert len(pieces) == 72 and len({p.group for p in pieces}) == 5
    assert_no_group_crosses(split_by_group(pieces, seed=0))


# --- validation, skip report, cache ----------------------------------------------------------
def test_bad_files_are_skipped_and_listed(midi_folder: Path, tmp_path: Path) -> None:
    (midi_folder / "garbage.mid").write_bytes(b"MThd this is not midi")
    write_midi(midi_folder / "silent.mid", [])
    (midi_folder / "album 0" / "empty.midi").write_bytes(b"")
    tok = build_tokenizer("performance")
    run = tmp_path / "run"
    corpus = build_corpus(folder_source(midi_folder), tok, run, tmp_path / "cache")
    reasons = {p.id: r for p, r in corpus.skipped}
    assert set(reasons) == {"garbage.mid", "silent.mid", "album 0/empty.midi"}
    assert "unreadable" in reasons["garbage.mid"] and reasons["silent.mid"] == "no notes"
    lines = (run / "skipped.tsv").read_text().splitlines()
    assert lines[0] == "id\tpath\treason" and len(lines) == 4
    used = sum(len(v) for v in corpus.splits.values())
    assert used == 8
    manifest = json.loads((run / "splits.json").read_text())
    seen = {}
    for split in ("train", "val", "test"):
        for g in manifest[split]["groups"]:
            assert seen.setdefault(g, split) == split


def test_too_long_file_is_skipped(tmp_path: Path) -> None:
    write_midi(tmp_path / "long.mid", [(60, 0.0, 1.0, 64), (62, 3700.0, 1.0, 64)])
    ok, skipped, _ = tokenize_pieces(folder_source(tmp_path), build_tokenizer("performance"),
                                     None)
    assert not ok and "more than 1 h" in skipped[0][1]


def test_second_run_tokenizes_nothing(midi_folder: Path, tmp_path: Path, monkeypatch) -> None:
    (midi_folder / "garbage.mid").write_bytes(b"not midi")
    tok = build_tokenizer("performance")
    pieces = folder_source(midi_folder)
    first, skipped1, hits1 = tokenize_pieces(pieces, tok, tmp_path / "c")
    assert hits1 == 0 and len(skipped1) == 1
    calls = []
    monkeypatch.setattr(tok, "encode", lambda s: calls.append(s))
    second, skipped2, hits2 = tokenize_pieces(pieces, tok, tmp_path / "c")
    assert calls == [] and hits2 == len(pieces)
    assert [(p.id, a.tolist()) for p, a in first] == [(p.id, a.tolist()) for p, a in second]
    assert skipped2 == skipped1


# --- datasets ----------------------------------------------------------------------------
def test_random_crop_is_deterministic_and_shifted() -> None:
    tok = build_tokenizer("performance")
    rng = np.random.default_rng(0)
    seqs = [add_bos_eos(tok.encode(_score(rng)), tok) for _ in range(3)]
    ds = RandomCropDataset(seqs, 32, tok, seed=7, augment=Augmentation(3, (0.95, 1.05)))
    a, b = ds[5], ds[5]
    assert a["input_ids"].shape == (32,) and a["labels"].shape == (32,)
    assert a["input_ids"].tolist() == b["input_ids"].tolist()
    assert ds[6]["input_ids"].tolist() != a["input_ids"].tolist()
    x, y = a["input_ids"], a["labels"]
    assert (x[1:] == y[:-1]).all()


def test_window_dataset_predicts_every_token_once() -> None:
    seqs = [np.arange(3, 3 + n, dtype=np.int64) for n in (10, 25, 7)]
    ds = WindowDataset(seqs, context_len=8, pad_id=0)
    labels = [t for i in range(len(ds)) for t in ds[i]["labels"].tolist() if t != IGNORE_INDEX]
    expected = [t for s in seqs for t in s[1:].tolist()]
    assert sorted(labels) == sorted(expected)


def test_unigram_entropy() -> None:
    assert unigram_entropy([np.array([1, 2, 1, 2])], 5) == pytest.approx(np.log(2))


def _score(rng: np.random.Generator):
    import symusic

    s = symusic.Score(480)
    t = symusic.Track(program=0)
    for i in range(60):
        t.notes.append(symusic.Note(i * 120, 100, int(rng.integers(40, 90)), 80))
    s.tracks.append(t)
    return s


def test_crops_cover_a_piece_evenly_opening_included():
    """Every position, the first (BOS) included, lands in about as many crops as any other;
    uniform starts in 0..length-take would put the first token in 1 crop in 901 here."""
    from mehldau.data.dataset import crop_start

    rng = np.random.default_rng(0)
    length, take = 1000, 100
    covered = np.zeros(length)
    for _ in range(20000):
        s = crop_start(rng, length, take)
        assert 0 <= s <= length - take
        covered[s:s + take] += 1
    assert 0.8 < covered[0] / covered[500] < 1.25
    assert 0.8 < covered[-1] / covered[500] < 1.25
    assert crop_start(rng, 50, take) == 0  # shorter than a crop: from its start
