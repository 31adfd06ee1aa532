"""Train/val/test splits by group that hold across runs, and the record of what a checkpoint
and every checkpoint it was built on trained on.

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
version: its groups keep their splits, whatever rule made them).

Lineage. A run that builds on a checkpoint (adapting, or scg_diffusion's diffusion stage on
its autoencoder) records in `lineage.json` the manifests of that base and of every checkpoint
the base was built on, nearest first; every checkpoint carries it, and `mehldau-merge` copies
the adapter's. The base's base's data is in the weights as much as the base's own: a chain
pretrain(all) -> adapt(Mehldau) -> merge -> adapt(Evans) must not test on an Evans album the
first stage trained on. So adapting freezes the splits of every group any ancestor lists, and
`check_leaks` refuses val/test pieces that any ancestor trained on, by group and by file
content. Weights without a manifest (a released Moonbeam `.pt`) are an ancestor whose data is
unknown: said once, not checked. `lineage_manifests(ckpt)` gives the whole record.
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
LINEAGE = "lineage.json"
LINEAGE_VERSION = 1
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


def assign_fixed(pieces: Sequence[Piece], ratios: Sequence[float] = (0.8, 0.1, 0.1),
                 seed: int = 0) -> list[Piece]:
    """For a catalogue that never grows (the embedded demo corpus, fixed by its version): the
    groups ranked by their draw `u`, the first round(r_test * n) to test, the next
    round(r_val * n) to val (at least one each when the ratio is positive and there are three
    groups or more), the rest to train. The ratios are then met as closely as whole groups
    allow; a hash alone dealt the demo's eight sets 4/2/2 at seed 0, a third of its music out
    of training. A growing catalogue must not use it: a new group shifts the ranks."""
    r = check_ratios(ratios)
    groups = sorted({p.group for p in pieces}, key=lambda g: group_draw(seed, "", g))
    n = len(groups)
    counts = [0, 0]
    for k, share in enumerate((r[2], r[1])):  # test, val
        counts[k] = int(round(share * n)) if n >= 3 else 0
        if n >= 3 and share > 0:
            counts[k] = max(counts[k], 1)
    n_test, n_val = counts
    split_of = {g: "test" if i < n_test else "val" if i < n_test + n_val else "train"
                for i, g in enumerate(groups)}
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


def _is_manifest(manifest: object) -> bool:
    return isinstance(manifest, dict) and all(
        isinstance(manifest.get(s), dict) and "groups" in manifest[s] for s in SPLITS)


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
    if not _is_manifest(manifest):
        raise UserError(f"{path} is not a split manifest (train/val/test with groups); pass a "
                        "run's splits.json")
    return manifest


def manifest_split_of(manifest: dict) -> dict[str, str]:
    return {g: s for s in SPLITS for g in manifest[s]["groups"]}


def apply_manifests(pieces: Sequence[Piece], manifests: Sequence[tuple[str, dict]]
                    ) -> list[Piece]:
    """Pieces whose group a manifest lists take its split (the first manifest that lists it:
    nearest first); other groups keep the catalogue rule's (they were never in those runs,
    so they cannot leak into them). `manifests`: (name, manifest) pairs."""
    split_of: dict[str, str] = {}
    for _, manifest in reversed(manifests):
        split_of.update(manifest_split_of(manifest))
    out = [replace(p, split=split_of.get(p.group, p.split)) for p in pieces]
    new = {p.group for p in pieces if p.group not in split_of}
    if new:
        also = " nor in its ancestors' manifests" if len(manifests) > 1 else ""
        print(f"splits: {len(new)} groups not in {manifests[0][0]}{also} were split by the "
              "catalogue rule", file=sys.stderr)
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


def _in_checkpoint(ckpt: Path, name: str, run_dirs: bool = True) -> Path | None:
    """A file a checkpoint carries: beside its weights, else in its run directory."""
    cands = [ckpt / name]
    if run_dirs:
        cands += [ckpt.parent.parent / name, ckpt.parent / name]
    return next((c for c in cands if c.is_file()), None)


def find_manifest(ckpt: Path) -> Path | None:
    """The manifest a checkpoint was trained with: beside it, or in its run directory."""
    return _in_checkpoint(ckpt, MANIFEST)


# --- lineage ----------------------------------------------------------------------------------
def _relation(depth: int) -> str:
    return "the base" + "'s base" * depth


def _ancestor(ckpt: Path) -> dict:
    """One entry of a lineage: a checkpoint (or weights file) and its manifest (None: its
    training data is unknown)."""
    path = find_manifest(ckpt) if ckpt.is_dir() else None
    return {"checkpoint": str(ckpt.absolute()),
            "manifest_file": str(path.absolute()) if path else None,
            "manifest": read_manifest(path) if path else None}


def ancestry(base: Path) -> list[dict]:
    """The lineage of a run built on `base` (a checkpoint directory, or a weights file such
    as a released `.pt`): `base` with its manifest, then `base`'s own ancestors."""
    return [_ancestor(base), *lineage_of(base)]


def _json_or_empty(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def lineage_of(ckpt: Path, _depth: int = 0) -> list[dict]:
    """The ancestors of a checkpoint, nearest first: its `lineage.json`, or, for a checkpoint
    written before lineage files, the chain its pointers still name (an adapter's
    `base.json`, a merged checkpoint's `merged_from`, a diffusion stage's `autoencoder`).
    A pointer to something gone is an ancestor whose data is unknown."""
    if not ckpt.is_dir():
        return []
    # In a run directory only: a merged checkpoint's parent folder is nobody's run.
    found = _in_checkpoint(ckpt, LINEAGE, run_dirs=ckpt.parent.name == "checkpoints")
    if found is not None:
        return read_lineage(found)
    if _depth > 32:
        raise UserError(f"{ckpt}: its checkpoints point to each other in a loop; restore the "
                        "checkpoints' base.json / meta.json")
    meta = _json_or_empty(ckpt / "meta.json")
    if meta.get("merged_from"):  # the adapter's manifest is this checkpoint's own
        source = Path(meta["merged_from"])
        if not source.is_dir():
            return [{"checkpoint": str(source), "manifest_file": None, "manifest": None}]
        return lineage_of(source, _depth + 1)
    parent = _json_or_empty(ckpt / "base.json").get("path") or meta.get("autoencoder")
    if not parent:
        return []
    return [_ancestor(Path(parent)), *lineage_of(Path(parent), _depth + 1)]


def read_lineage(path: Path) -> list[dict]:
    data = _json_or_empty(path)
    ancestors = data.get("ancestors")
    if not isinstance(ancestors, list) or not all(
            isinstance(a, dict) and isinstance(a.get("checkpoint"), str)
            and (a.get("manifest") is None or _is_manifest(a["manifest"])) for a in ancestors):
        raise UserError(f"{path} is not a lineage file (ancestors with their manifests); "
                        "restore it from the run directory that wrote it")
    return ancestors


def write_lineage(ancestors: Sequence[dict], path: Path) -> None:
    with atomic_file(path) as f:
        json.dump({"version": LINEAGE_VERSION, "ancestors": list(ancestors)}, f, indent=1)


def lineage_manifests(ckpt: Path) -> list[tuple[str, dict | None]]:
    """(name, manifest) for a checkpoint and everything its weights learned from: its own
    manifest first (an adapter's or a merged checkpoint's is the adapter run's), then each
    ancestor's, nearest first. None: not known (no manifest; released weights)."""
    own = find_manifest(ckpt)
    return [(str(ckpt), read_manifest(own) if own else None),
            *((a["checkpoint"], a["manifest"]) for a in lineage_of(ckpt))]


def training_pieces(ckpt: Path) -> list[tuple[str, dict]]:
    """Every training piece of a checkpoint and of its ancestors, as (the checkpoint that
    trained on it, its manifest entry: id, group, absolute path, sha when known), nearest
    first, each file once. Ancestors without a manifest add nothing."""
    seen: set[str] = set()
    out = []
    for name, manifest in lineage_manifests(ckpt):
        for entry in (manifest or {}).get("train", {}).get("pieces", []):
            if entry["path"] not in seen:
                seen.add(entry["path"])
                out.append((name, entry))
    return out


def check_leaks(pieces: Sequence[Piece], ancestors: Sequence[tuple[str, dict]],
                force: bool = False, hash_of=None) -> None:
    """Refuse pieces in val/test whose group, or whose file content, any ancestor trained on.

    `ancestors`: (name, manifest) pairs, nearest first; the message names the nearest that
    leaks. `hash_of(path) -> str` hashes a file; the manifests' pieces carry theirs, so a file
    renamed or regrouped since is still caught."""
    held = [p for p in pieces if p.split in ("val", "test")]
    sha: dict[str, str | None] = {}

    def sha_of(p: Piece) -> str | None:
        if p.id not in sha:
            sha[p.id] = hash_of(p.path) if hash_of is not None and p.path.is_file() else None
        return sha[p.id]

    def leaked(manifest: dict) -> list[Piece]:
        trained = set(manifest["train"]["groups"])
        trained_sha = {e["sha"] for e in manifest["train"].get("pieces", []) if "sha" in e}
        return [p for p in held if p.group in trained
                or (trained_sha and sha_of(p) in trained_sha)]

    found = next(((name, bad) for name, manifest in ancestors if (bad := leaked(manifest))),
                 None)
    if found is None:
        return
    name, bad = found
    msg = (f"{len(bad)} val/test pieces were in the training data of {name} "
           f"(e.g. {bad[0].id}, group '{bad[0].group}')")
    if force:
        print(f"warning: {msg}; force=true: every base-vs-adapted figure on them is measured "
              "on training data", file=sys.stderr)
        return
    raise UserError(f"{msg}; use the base's manifests (drop split.manifest) or its grouping, "
                    "or add force=true")


def splits_for_run(pieces: Sequence[Piece], manifest: str | Path | None = None,
                   ancestors: Sequence[dict] = (), force: bool = False, hash_of=None
                   ) -> tuple[list[Piece], dict]:
    """The run's pieces with their final splits, and the rule to record in its manifest.

    `manifest` (`split.manifest=FILE`) freezes splits from any earlier run. `ancestors`: the
    lineage of a run built on a checkpoint (`ancestry(base)`, the base first). Without
    `manifest` the ancestors' manifests freeze the groups they list (the nearest that lists
    a group decides); in every case val/test pieces any ancestor trained on are refused
    (`force` warns instead)."""
    pieces = list(pieces)
    rule: dict = dict(RULE)
    named = [(f"{a['checkpoint']} ({_relation(i)})", a) for i, a in enumerate(ancestors)]
    known = [(name, a["manifest"]) for name, a in named if a["manifest"] is not None]
    if manifest is not None:
        pieces = apply_manifests(pieces, [(str(manifest), read_manifest(manifest))])
        rule["manifest"] = str(Path(manifest).expanduser())
    elif known:
        pieces = apply_manifests(pieces, known)
        nearest = next(a for a in ancestors if a["manifest"] is not None)
        rule["manifest"] = nearest.get("manifest_file") or nearest["checkpoint"]
    unknown = [name for name, a in named if a["manifest"] is None]
    if unknown:
        more = f" (and {len(unknown) - 1} more ancestors)" if len(unknown) > 1 else ""
        print(f"warning: {unknown[0]}{more} has no {MANIFEST}; cannot check that it never "
              "trained on this run's val/test pieces", file=sys.stderr)
    if known:
        check_leaks(pieces, known, force, hash_of)
    if ancestors:
        rule["base_manifest"] = ancestors[0].get("manifest_file")
        rule["ancestors"] = [a["checkpoint"] for a in ancestors]
    return pieces, rule
