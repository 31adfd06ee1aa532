"""Train/val/test splits by group that hold across runs and as the catalogue grows.

No group (album) is ever in two splits, and a group's split never depends on which subset of
the catalogue a run uses, nor on which other groups the catalogue holds. A split computed over
"the files this run reads" moves whenever the subset moves: pretraining on every PiJAMA pianist
and then adapting on Mehldau alone would deal Mehldau's albums twice, and the adapted model
would be tested on albums its base trained on. So a source assigns splits over its whole
catalogue (every album of PiJAMA's CSV before the pianist filter; every file of a folder
before any is parsed or skipped) and a run only filters.

The rule (`ratios` train/val/test, normalised, and `seed`). Each group g of stratum S (PiJAMA:
the pianist; a folder: the top-level folder; a group whose pieces lie in several strata, one
tune in two folders with group_by=regex, belongs to the first by name) draws u, a blake2b hash
of (S, g) keyed with the seed, read as a number in [0, 1): test if u < r_test, val if
u < r_test + r_val, else train. Adding or removing any other group, pianist or folder never
moves it.

The one exception is the guarantee: in a stratum of three groups or more every split with a
positive ratio holds at least one group, so each pianist with three albums or more has an
album in val, one in test and one to train on. An empty split (test, then val, then train)
takes the group whose u is nearest its interval, among the groups whose split holds two or
more (filling one split never empties another); for test and val only among those holding
at most twice the split's share of the stratum's pieces if there are any, else the one with
the fewest pieces (a 32-track box set must not take half a pianist out of training). Only
such a forced pick depends on other groups, and only on its own stratum's. A stratum of one
or two groups has no guarantee: with group_by=top_dir every folder is its own stratum, so a
folder of a few album folders may deal none to val or test (`split.seed` deals another hand).
Hashing rather than dealing is what keeps splits still: any rule that guarantees a val group
in a pooled set must move a group when a set with none grows by one that lands in val
(manifests up to version 2 pooled small strata and dealt them in one seeded draw, so adding
a one-album pianist moved 25 of PiJAMA's 259 albums).

A manifest (`splits.json`) freezes the result; `split.manifest=FILE` reuses one (of any
version: its groups keep their splits, whatever rule made them), and `check_leaks` refuses
adapting on data whose val/test groups (or files) a base trained on.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from mehldau.data.sources import Piece
from mehldau.errors import UserError
from mehldau.io import atomic_file

SPLITS = ("train", "val", "test")
MANIFEST = "splits.json"
MANIFEST_VERSION = 3
# How the splits were dealt, recorded in every manifest's `rule`.
RULE = {"by": "group, stratified by style (pianist or top folder), over the source's whole "
              "catalogue",
        "deal": "u = blake2b(seed; stratum, group) in [0, 1): test below r_test, val below "
                "r_test + r_val; a stratum of >= 3 groups fills each empty split (test, val, "
                "train) with the group nearest its interval"}


def check_ratios(ratios: Sequence[float]) -> np.ndarray:
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise UserError(f"split.ratios must be three non-negative numbers with a positive sum, "
                        f"got {list(ratios)}")
    r = np.asarray(ratios, dtype=float)
    return r / r.sum()


def group_draw(seed: int, stratum: str, group: str) -> float:
    """u in [0, 1) for one group: a keyed hash of its stratum and name alone, the same on
    every machine and Python (never `hash`, which is salted per process)."""
    digest = hashlib.blake2b(json.dumps([stratum, group]).encode(), digest_size=8,
                             key=str(int(seed)).encode()).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _distance(u: float, interval: tuple[float, float]) -> float:
    return max(interval[0] - u, u - interval[1], 0.0)


def _deal(stratum: str, groups: dict[str, int], ratios: np.ndarray, seed: int
          ) -> dict[str, str]:
    """Groups (name -> piece count) of one stratum -> group -> split."""
    u = {g: group_draw(seed, stratum, g) for g in groups}
    _, r_val, r_test = ratios
    interval = {"test": (0.0, r_test), "val": (r_test, r_test + r_val),
                "train": (r_test + r_val, 1.0)}
    out = {g: "test" if u[g] < r_test else "val" if u[g] < r_test + r_val else "train"
           for g in groups}
    if len(groups) < 3:
        return out
    total = sum(groups.values())
    for s in ("test", "val", "train"):
        share = ratios[SPLITS.index(s)]
        if share <= 0 or s in out.values():
            continue
        count = {t: sum(v == t for v in out.values()) for t in SPLITS}
        donors = [g for g in sorted(groups) if count[out[g]] >= 2]  # >= 3 groups: never none
        nearest = sorted(donors, key=lambda g: _distance(u[g], interval[s]))
        if s == "train":
            out[nearest[0]] = s
            continue
        fits = [g for g in nearest if groups[g] <= 2 * share * total]
        out[fits[0] if fits else min(nearest, key=lambda g: groups[g])] = s
    return out


def assign_splits(pieces: Sequence[Piece], ratios: Sequence[float] = (0.8, 0.1, 0.1),
                  seed: int = 0) -> list[Piece]:
    """Every piece with its `split` set by the catalogue rule above (input order kept)."""
    r = check_ratios(ratios)
    stratum_of: dict[str, str] = {}
    size: dict[str, int] = defaultdict(int)
    for p in pieces:
        stratum_of[p.group] = min(stratum_of.get(p.group, p.style), p.style)
        size[p.group] += 1
    strata: dict[str, dict[str, int]] = defaultdict(dict)
    for g, s in stratum_of.items():
        strata[s][g] = size[g]
    split_of: dict[str, str] = {}
    for name, groups in strata.items():
        split_of.update(_deal(name, groups, r, seed))
    return [replace(p, split=split_of[p.group]) for p in pieces]


def by_split(pieces: Sequence[Piece]) -> dict[str, list[Piece]]:
    out: dict[str, list[Piece]] = {s: [] for s in SPLITS}
    for p in pieces:
        out[p.split].append(p)
    return {s: sorted(v, key=lambda p: p.id) for s, v in out.items()}


def split_by_group(pieces: Sequence[Piece], ratios: Sequence[float] = (0.8, 0.1, 0.1),
                   seed: int = 0) -> dict[str, list[Piece]]:
    """`assign_splits` over `pieces` as the whole catalogue, grouped by split."""
    return by_split(assign_splits(pieces, ratios, seed))


# --- manifests --------------------------------------------------------------------------------
def shared_titles(pieces: Sequence[Piece]) -> dict[str, dict[str, list[str]]]:
    """Tune titles played in more than one split (the same standard on two albums): not a
    leak of recordings, but a model may have learned the tune's changes from another take."""
    where: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for p in pieces:
        if p.title:
            where[p.title][p.split].append(p.id)
    return {t: dict(s) for t, s in sorted(where.items()) if len(s) > 1}


def write_manifest(pieces: Sequence[Piece], path: str | Path, rule: dict | None = None,
                   hashes: dict[str, str] | None = None) -> dict:
    """JSON manifest (atomically): for each split its groups and pieces (id, group, path,
    content hash when known), the rule that made it, and the titles found in several splits."""
    hashes = hashes or {}
    splits = by_split(pieces)
    manifest: dict = {
        s: {"groups": sorted({p.group for p in ps}),
            "pieces": [{"id": p.id, "group": p.group, "path": str(Path(p.path).absolute()),
                        **({"sha": hashes[p.id]} if p.id in hashes else {})} for p in ps]}
        for s, ps in splits.items()}
    manifest["version"] = MANIFEST_VERSION
    manifest["rule"] = rule or {}
    manifest["titles_in_several_splits"] = shared_titles(pieces)
    with atomic_file(path) as f:
        json.dump(manifest, f, indent=1)
    return manifest


def read_manifest(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"split manifest {path}: {e.strerror}; pass a run's splits.json") from e
    except ValueError as e:
        raise UserError(f"split manifest {path} is not JSON; pass a run's splits.json") from e
    if not isinstance(manifest, dict) or not all(
            isinstance(manifest.get(s), dict) and "groups" in manifest[s] for s in SPLITS):
        raise UserError(f"{path} is not a split manifest (train/val/test with groups); pass a "
                        "run's splits.json")
    return manifest


def manifest_split_of(manifest: dict) -> dict[str, str]:
    return {g: s for s in SPLITS for g in manifest[s]["groups"]}


def apply_manifest(pieces: Sequence[Piece], manifest: dict, name: str = "manifest"
                   ) -> list[Piece]:
    """Pieces whose group the manifest lists take its split; other groups keep the catalogue
    rule's (they were never in the manifest's run, so they cannot leak into it)."""
    split_of = manifest_split_of(manifest)
    out = [replace(p, split=split_of.get(p.group, p.split)) for p in pieces]
    new = {p.group for p in pieces if p.group not in split_of}
    if new:
        print(f"splits: {len(new)} groups not in {name} were split by the catalogue rule",
              file=sys.stderr)
    return out


def resume_pieces(pieces: Sequence[Piece], manifest: dict, hash_of=None) -> list[Piece]:
    """A resumed run's corpus: the pieces its own manifest lists, in their splits, whatever
    else the source holds now. One line each on stderr for listed files that are gone
    (training goes on without them), files whose content changed since (their new content
    is used) and files the source has that the run never saw (left out)."""
    listed = {e["id"]: (s, e) for s in SPLITS for e in manifest[s].get("pieces", [])}
    present = {p.id for p in pieces}
    out, changed = [], []
    for p in pieces:
        if p.id not in listed:
            continue
        split, entry = listed[p.id]
        if hash_of is not None and "sha" in entry and hash_of(p.path) != entry["sha"]:
            changed.append(p.id)
        out.append(replace(p, split=split))
    gone = [pid for pid in listed if pid not in present]
    new = [p.id for p in pieces if p.id not in listed]
    for ids, what in ((gone, f"of the run's {MANIFEST} are gone; training goes on without them"),
                      (changed, "changed since the run started; their new content is used"),
                      (new, "are new to the source; left out of the resumed run")):
        if ids:
            print(f"resume: {len(ids)} files {what} (e.g. {ids[0]})", file=sys.stderr)
    return out


def find_manifest(ckpt: Path) -> Path | None:
    """The manifest a checkpoint was trained with: beside it, or in its run directory."""
    for cand in (ckpt / MANIFEST, ckpt.parent.parent / MANIFEST, ckpt.parent / MANIFEST):
        if cand.is_file():
            return cand
    return None


def check_leaks(pieces: Sequence[Piece], base: dict, base_name: str, force: bool = False,
                hash_of=None) -> None:
    """Refuse pieces in val/test whose group, or whose file content, the base trained on.

    `hash_of(piece) -> str` hashes a file; the base manifest's pieces carry theirs, so a
    file renamed or regrouped since is still caught."""
    trained = set(base["train"]["groups"])
    held = [p for p in pieces if p.split in ("val", "test")]
    bad = [p for p in held if p.group in trained]
    if not bad and hash_of is not None:
        trained_sha = {e["sha"] for e in base["train"].get("pieces", []) if "sha" in e}
        if trained_sha:
            bad = [p for p in held if p.path.is_file() and hash_of(p.path) in trained_sha]
    if not bad:
        return
    msg = (f"{len(bad)} val/test pieces were in the training data of {base_name} "
           f"(e.g. {bad[0].id}, group '{bad[0].group}')")
    if force:
        print(f"warning: {msg}; force=true: every base-vs-adapted figure on them is measured "
              "on training data", file=sys.stderr)
        return
    raise UserError(f"{msg}; use the base's manifest (drop split.manifest) or its grouping, "
                    "or add force=true")


def splits_for_run(pieces: Sequence[Piece], manifest: str | Path | None = None,
                   base_ckpt: Path | None = None, force: bool = False, hash_of=None
                   ) -> tuple[list[Piece], dict]:
    """The run's pieces with their final splits, and the rule to record in its manifest.

    `manifest` (`split.manifest=FILE`) freezes splits from any earlier run. Adapting
    (`base_ckpt`, a checkpoint directory) uses the base's manifest when none is given, and
    in every case refuses val/test pieces the base trained on (`force` warns instead)."""
    pieces = list(pieces)
    rule: dict = dict(RULE)
    base_path = find_manifest(base_ckpt) if base_ckpt is not None and base_ckpt.is_dir() else None
    if manifest is not None:
        frozen = read_manifest(manifest)
        pieces = apply_manifest(pieces, frozen, str(manifest))
        rule["manifest"] = str(Path(manifest).expanduser())
    elif base_path is not None:
        pieces = apply_manifest(pieces, read_manifest(base_path), f"the base's {MANIFEST}")
        rule["manifest"] = str(base_path)
    if base_ckpt is not None:
        if base_path is None:
            print(f"warning: {base_ckpt} has no {MANIFEST}; cannot check that the base never "
                  "trained on this run's val/test pieces", file=sys.stderr)
        else:
            check_leaks(pieces, read_manifest(base_path), str(base_ckpt), force, hash_of)
            rule["base_manifest"] = str(base_path)
    return pieces, rule
