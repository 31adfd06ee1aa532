"""Train/val/test splits by group that hold across runs: no group (album) is ever in two
splits, and a group's split never depends on which subset of the catalogue a run uses.

Why a function of the whole catalogue: a split computed over "the files this run reads" moves
whenever the subset moves. Pretraining on every PiJAMA pianist and then adapting on Mehldau
alone would deal Mehldau's five albums twice, independently, and the adapted model would be
validated and tested on albums its base trained on. So a source assigns splits over its
whole catalogue (every album in PiJAMA's CSV before the pianist filter; every file of a
folder before any is parsed or skipped) and a run only filters.

The rule, per stratum (PiJAMA: the pianist; a folder: the top-level folder), with
`ratios` and `seed`: a stratum with at least three groups is dealt on its own, so every
pianist with three albums or more has at least one album in val and one in test; the
groups of smaller strata are pooled and dealt together. Dealing: groups in a seeded order
(the stratum's name is part of the seed, so adding a pianist moves no one else), one each
to test and val first (the first that holds at most twice the split's share of pieces, so a
box set does not take half a pianist's music out of training), then each to the split
furthest below its share of pieces.

A manifest (`splits.json`) freezes the result; `split.manifest=FILE` reuses one, and
`check_leaks` refuses adapting on data whose val/test groups (or files) a base trained on.
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
MANIFEST_VERSION = 2


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def check_ratios(ratios: Sequence[float]) -> np.ndarray:
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise UserError(f"split.ratios must be three non-negative numbers with a positive sum, "
                        f"got {list(ratios)}")
    r = np.asarray(ratios, dtype=float)
    return r / r.sum()


def _deal(groups: dict[str, int], ratios: np.ndarray, rng: np.random.Generator
          ) -> dict[str, str]:
    """Groups (name -> piece count) of one stratum -> group -> split."""
    names = sorted(groups)
    names = [names[i] for i in rng.permutation(len(names))]
    targets = ratios * sum(groups.values())
    counts = dict.fromkeys(SPLITS, 0)
    out: dict[str, str] = {}
    queue = list(names)
    for s in ("test", "val"):  # never empty when there are enough groups
        i = SPLITS.index(s)
        if len(names) >= 3 and ratios[i] > 0:
            # the next group in seeded order that is at most twice the split's share (else
            # the smallest): one 32-track box set must not take half a pianist into test
            fits = [g for g in queue if groups[g] <= 2 * targets[i]]
            g = fits[0] if fits else min(queue, key=lambda g: groups[g])
            queue.remove(g)
            out[g] = s
            counts[s] += groups[g]
    for g in queue:
        s = SPLITS[int(np.argmax([targets[i] - counts[s] for i, s in enumerate(SPLITS)]))]
        out[g] = s
        counts[s] += groups[g]
    return out


def assign_splits(pieces: Sequence[Piece], ratios: Sequence[float] = (0.8, 0.1, 0.1),
                  seed: int = 0) -> list[Piece]:
    """Every piece with its `split` set by the catalogue rule above (input order kept)."""
    r = check_ratios(ratios)
    strata: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for p in pieces:
        strata[p.style][p.group] += 1
    pooled: dict[str, int] = {}
    split_of: dict[str, str] = {}
    for name in sorted(strata):
        groups = strata[name]
        if len(groups) >= 3:
            rng = np.random.default_rng([seed, _stable_int(name)])
            split_of.update(_deal(groups, r, rng))
        else:
            pooled.update(groups)
    if pooled:
        split_of.update(_deal(pooled, r, np.random.default_rng([seed, 0])))
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
    rule: dict = {"by": "group, stratified by style (pianist or top folder), over the "
                        "source's whole catalogue"}
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
