"""Deterministic train/val/test splits by group: no group (album) is ever in two splits.

Groups are shuffled with a seeded RNG over their sorted names (so the result depends only on
the set of groups, the ratios and the seed, not on file order) and dealt out greedily by piece
count until each split reaches its share. With at least three groups, val and test each get
at least one group, so a small folder still has something to validate on.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mehldau.data.sources import Piece
from mehldau.errors import UserError
from mehldau.io import atomic_file

SPLITS = ("train", "val", "test")


def split_by_group(
    pieces: Sequence[Piece], ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, list[Piece]]:
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise UserError(f"data.split_ratios must be three non-negative numbers, got {ratios}")
    by_group: dict[str, list[Piece]] = defaultdict(list)
    for p in pieces:
        by_group[p.group].append(p)
    groups = sorted(by_group)
    order = np.random.default_rng(seed).permutation(len(groups))
    groups = [groups[i] for i in order]

    total = len(pieces)
    r = np.asarray(ratios, dtype=float) / sum(ratios)
    targets = r * total
    assigned: dict[str, list[str]] = {s: [] for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    # Reserve one group each for the smaller splits first, so they are never empty when
    # there are enough groups; then fill by largest remaining deficit.
    queue = list(groups)
    for s in ("val", "test"):
        if len(groups) >= 3 and r[SPLITS.index(s)] > 0 and queue:
            g = queue.pop()
            assigned[s].append(g)
            counts[s] += len(by_group[g])
    for g in queue:
        deficits = [targets[i] - counts[s] for i, s in enumerate(SPLITS)]
        s = SPLITS[int(np.argmax(deficits))]
        assigned[s].append(g)
        counts[s] += len(by_group[g])
    return {s: sorted((p for g in assigned[s] for p in by_group[g]), key=lambda p: p.id)
            for s in SPLITS}


def write_manifest(splits: dict[str, list[Piece]], path: str | Path) -> None:
    """JSON manifest: for each split, its groups and piece ids (written atomically)."""
    manifest = {
        s: {
            "groups": sorted({p.group for p in ps}),
            "pieces": [{"id": p.id, "group": p.group, "path": str(p.path)} for p in ps],
        }
        for s, ps in splits.items()
    }
    with atomic_file(path) as f:
        json.dump(manifest, f, indent=1)
