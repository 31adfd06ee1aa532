"""The synthetic pianists corpus: determinism, the demo corpus left byte-identical, styles that
simple statistics tell apart, splits by album per pianist, and the `data=pianists` source."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import symusic
from conftest import write_midi
from omegaconf import OmegaConf

from mehldau.data.demo import PIANISTS, PIANISTS_VERSION, write_demo_corpus, write_pianist_corpus
from mehldau.data.sources import Piece, folder_source, pianists_source, pieces_from_config
from mehldau.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# sha256 of `write_demo_corpus(root, seed=0)`, taken before pianist profiles were added: over
# every file (its path relative to root, then its bytes, in sorted order), and of two files.
DEMO_SEED0_SHA = "3e895cbd380c8af65dbdf49dc9aebd8a71ff9f553405541d92dd864086dd5899"
DEMO_SEED0_FILES = {
    "set_01_first_light/01_crooked_station.mid":
        "2e5021bef67f3fbd89971d9d70abf21d7999f331b4b8e251c6551c818a631c42",
    "set_08_late_set/06_quiet_lighthouse.mid":
        "a6bf6b4411568b32bc605a3563c26bdd456369fd9e27d2a8b0f447043f75b499",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("pianists")
    return root, write_pianist_corpus(root, seed=0)


def _features(path: Path) -> list[float]:
    """Per-piece statistics: mean pitch, notes/s, median inter-onset (s), mean and sd of
    velocity, where the off-beat eighth falls (swing) and the share of notes below C3."""
    score = symusic.Score(str(path))
    notes = score.tracks[0].notes
    beats = np.array([n.time for n in notes]) / score.ticks_per_quarter
    sec = score.to("second")
    onsets = np.array([n.time for n in sec.tracks[0].notes])
    pitch = np.array([n.pitch for n in notes], dtype=float)
    vel = np.array([n.velocity for n in notes], dtype=float)
    frac = beats % 1
    off = frac[(frac > 0.4) & (frac < 0.8)]
    return [pitch.mean(), len(notes) / sec.end(), float(np.median(np.diff(np.unique(
        np.round(onsets, 2))))), vel.mean(), vel.std(), float(np.median(off)),
        float((pitch < 48).mean())]


FEATURES = ("mean_pitch", "notes_per_s", "median_ioi_s", "velocity", "velocity_sd", "swing",
            "low_share")


@pytest.fixture(scope="module")
def features(corpus: tuple[Path, list[Path]]) -> dict[Path, np.ndarray]:
    return {p: np.array(_features(p)) for p in corpus[1]}


def test_layout_and_names(corpus: tuple[Path, list[Path]]) -> None:
    root, paths = corpus
    assert len(PIANISTS) >= 5 and isinstance(PIANISTS_VERSION, int)
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", name) for name in PIANISTS)
    assert paths == sorted(paths) and len(paths) == len(PIANISTS) * 4 * 3
    rel = [p.relative_to(root).parts for p in paths]
    assert all(len(r) == 3 and r[2].endswith(".mid") for r in rel)
    assert {r[0] for r in rel} == set(PIANISTS)
    for name in PIANISTS:
        assert len({r[1] for r in rel if r[0] == name}) == 4
    # Atomic writes leave nothing else behind.
    assert sorted(p for p in root.rglob("*") if p.is_file()) == paths


def test_same_seed_same_bytes_other_seed_differs(corpus: tuple[Path, list[Path]],
                                                 tmp_path: Path) -> None:
    root, paths = corpus
    again = write_pianist_corpus(tmp_path / "again", seed=0)
    other = write_pianist_corpus(tmp_path / "other", seed=1)
    rel = [p.relative_to(root) for p in paths]
    assert [p.relative_to(tmp_path / "again") for p in again] == rel
    assert [p.relative_to(tmp_path / "other") for p in other] == rel  # layout: seed-free
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths, again))
    assert all(a.read_bytes() != b.read_bytes() for a, b in zip(paths, other))


def test_demo_corpus_bytes_unchanged(tmp_path: Path) -> None:
    paths = write_demo_corpus(tmp_path, seed=0)
    whole = hashlib.sha256()
    for p in paths:
        whole.update(p.relative_to(tmp_path).as_posix().encode())
        whole.update(p.read_bytes())
    for rel, sha in DEMO_SEED0_FILES.items():
        assert hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() == sha, rel
    assert whole.hexdigest() == DEMO_SEED0_SHA


def test_pieces_are_short_and_readable(corpus: tuple[Path, list[Path]]) -> None:
    for p in corpus[1]:
        score = symusic.Score(str(p))
        assert 25 <= score.to("second").end() <= 50, p
        assert len(score.tracks[0].notes) > 60, p
        assert all(21 <= n.pitch <= 108 for n in score.tracks[0].notes)


def test_nearest_centroid_tells_the_pianists_apart(corpus: tuple[Path, list[Path]],
                                                   features: dict[Path, np.ndarray]) -> None:
    # Centroids from each pianist's first two albums; the last two albums are held out.
    root = corpus[0]
    train, test = defaultdict(list), []
    for p, f in features.items():
        name, album = p.relative_to(root).parts[:2]
        if album[:2] in ("01", "02"):
            train[name].append(f)
        else:
            test.append((name, f))
    pooled = np.array([f for fs in train.values() for f in fs])
    mu, sd = pooled.mean(0), pooled.std(0) + 1e-9
    names = sorted(train)
    centroids = np.array([np.mean((np.array(train[n]) - mu) / sd, 0) for n in names])
    right = sum(names[int(np.argmin(((centroids - (f - mu) / sd) ** 2).sum(1)))] == n
                for n, f in test)
    assert right >= 0.9 * len(test), f"{right}/{len(test)} held-out pieces"


def test_profiles_show_their_habits(corpus: tuple[Path, list[Path]],
                                    features: dict[Path, np.ndarray]) -> None:
    by: dict[str, list[np.ndarray]] = defaultdict(list)
    for p, f in features.items():
        by[p.relative_to(corpus[0]).parts[0]].append(f)
    m = {n: dict(zip(FEATURES, np.mean(fs, 0))) for n, fs in by.items()}
    assert min(m, key=lambda n: m[n]["velocity"]) == "ada_lowell"  # soft
    assert max(m, key=lambda n: m[n]["velocity"]) == "clara_voss"  # loud
    assert min(m, key=lambda n: m[n]["notes_per_s"]) == "ada_lowell"  # sparse
    assert min(m, key=lambda n: m[n]["swing"]) == "dev_marin" and m["dev_marin"]["swing"] < 0.55
    assert max(m, key=lambda n: m[n]["swing"]) == "clara_voss" and m["clara_voss"]["swing"] > 0.66
    assert min(m, key=lambda n: m[n]["mean_pitch"]) == "elsa_ferrante"  # low register
    assert max(m, key=lambda n: m[n]["velocity_sd"]) == "dev_marin"  # wide dynamics


def test_splits_by_album_per_pianist(tmp_path: Path) -> None:
    pieces = pianists_source(tmp_path)
    assert (tmp_path / f"pianists-v{PIANISTS_VERSION}-seed0" / ".complete").is_file()
    split_of: dict[str, set[str]] = defaultdict(set)
    per_pianist: dict[str, set[str]] = defaultdict(set)
    for p in pieces:
        assert p.style == p.id.split("/")[0] and p.group.endswith("/".join(p.id.split("/")[:2]))
        split_of[p.group].add(p.split)
        per_pianist[p.style].add(p.split)
    assert all(len(s) == 1 for s in split_of.values()), "an album in two splits"
    assert len(split_of) == 4 * len(PIANISTS)
    assert per_pianist == {n: {"train", "val", "test"} for n in PIANISTS}


def test_data_pianists_through_the_config(tmp_path: Path) -> None:
    data = OmegaConf.load(CONFIGS / "data" / "pianists.yaml")
    everyone = pieces_from_config(data, tmp_path)
    assert {p.style for p in everyone} == set(PIANISTS)
    data.pianist = "ben_okafor"
    one = pieces_from_config(data, tmp_path)
    assert one and {p.style for p in one} == {"ben_okafor"}
    # Filtering keeps the splits the whole catalogue dealt.
    assert one == [p for p in everyone if p.style == "ben_okafor"]


def test_unknown_pianist_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        pianists_source(tmp_path, pianist="brad_mehldau")
    msg = str(e.value)
    assert "\n" not in msg and "brad_mehldau" in msg and all(n in msg for n in PIANISTS)


def test_folder_group_by_album(tmp_path: Path) -> None:
    notes = [(60, 0.0, 0.5, 80)]
    for rel in ("ann/one/a.mid", "ann/one/deeper/b.mid", "ann/two/c.mid", "bob/d.mid",
                "e.mid"):
        write_midi(tmp_path / "lib" / rel, notes)
    pieces: list[Piece] = folder_source(tmp_path / "lib", group_by="album")
    group = {p.id: p.group for p in pieces}
    assert group == {"ann/one/a.mid": "lib/ann/one", "ann/one/deeper/b.mid": "lib/ann/one",
                     "ann/two/c.mid": "lib/ann/two", "bob/d.mid": "lib/bob",
                     "e.mid": "lib/e.mid"}
    assert {p.id: p.style for p in pieces}["ann/two/c.mid"] == "ann"
