"""The split rule on a copy of PiJAMA's metadata: how big each split is, and how stable.

    python benchmarks/splits.py --csv ~/pijama/pijama.csv [--seed 0] [--pianist "Brad Mehldau"]

Reads the CSV alone (no MIDI is opened) and prints, for the catalogue rule of
`mehldau.data.splits` with `--ratios` and `--seed`:

- pieces, albums and hours (PiJAMA's `duration_sec`, when the CSV has it) per split;
- the albums of `--pianist` per split;
- how many pianists with three albums or more have an album in val and one in test;
- how many existing albums change split when the catalogue grows: by one one-album pianist
  (`--trials` made-up names), and by one album of an existing pianist with three albums or
  more (`--trials` of them, drawn with `--seed`). Each trial is one made-up album of 10
  pieces; the figure is min / median / max over the trials.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from mehldau.data.sources import Piece, pijama_source
from mehldau.data.splits import SPLITS, assign_splits
from mehldau.errors import UserError


def album_splits(pieces: list[Piece]) -> dict[str, str]:
    return {p.group: p.split for p in pieces}


def moved(before: dict[str, str], pieces: list[Piece]) -> int:
    after = album_splits(pieces)
    return sum(after[g] != s for g, s in before.items())


def made_up_album(artist: str, album: str) -> list[Piece]:
    return [Piece(id=f"new-{artist}-{album}-{k}", path=Path("none"), group=f"{artist} / {album}",
                  style=artist) for k in range(10)]


def spread(values: list[int]) -> str:
    return f"{min(values)} / {statistics.median(values):g} / {max(values)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", required=True, type=Path, help="PiJAMA's pijama.csv")
    ap.add_argument("--seed", type=int, default=0, help="split.seed (default 0)")
    ap.add_argument("--ratios", type=float, nargs=3, default=(0.8, 0.1, 0.1))
    ap.add_argument("--pianist", default="Brad Mehldau")
    ap.add_argument("--trials", type=int, default=20)
    a = ap.parse_args()
    try:
        pieces = pijama_source(a.csv.parent, a.csv, pianist=None, ratios=a.ratios, seed=a.seed)
    except UserError as e:
        print(f"splits: error: {e}", file=sys.stderr)
        return 2
    with open(a.csv, newline="", encoding="utf-8") as f:
        seconds = {f"pijama-{r['id']}": float(r.get("duration_sec") or "nan")
                   for r in csv.DictReader(f)}
    hours_known = all(s == s for s in seconds.values())  # NaN: a column the CSV lacks

    albums_of: dict[str, set[str]] = defaultdict(set)
    for p in pieces:
        albums_of[p.style].add(p.group)
    print(f"{len(pieces)} pieces, {len(album_splits(pieces))} albums, {len(albums_of)} "
          f"pianists; ratios {list(a.ratios)}, seed {a.seed}")
    print(f"{'split':<6} {'pieces':>7} {'albums':>7}" + (f" {'hours':>7}" if hours_known else "")
          + f" {a.pianist + ' albums':>24}")
    for s in SPLITS:
        ps = [p for p in pieces if p.split == s]
        line = f"{s:<6} {len(ps):>7} {len({p.group for p in ps}):>7}"
        if hours_known:
            line += f" {sum(seconds[p.id] for p in ps) / 3600:>7.1f}"
        print(line + f" {len({p.group for p in ps if p.style == a.pianist}):>24}")

    big = sorted(n for n, g in albums_of.items() if len(g) >= 3)
    held = {n: {p.split for p in pieces if p.style == n} for n in big}
    both = sum({"val", "test"} <= s for s in held.values())
    print(f"pianists with >= 3 albums: {len(big)}, with a val and a test album: {both}")

    before = album_splits(pieces)
    new_pianist = [moved(before, assign_splits(
        pieces + made_up_album(f"Newcomer {t}", "Debut"), a.ratios, a.seed))
        for t in range(a.trials)]
    rng = np.random.default_rng(a.seed)
    new_album = [moved(before, assign_splits(
        pieces + made_up_album(str(rng.choice(big)), f"Found tape {t}"), a.ratios, a.seed))
        for t in range(a.trials)]
    print(f"albums moved (min / median / max over {a.trials} trials): adding a one-album "
          f"pianist {spread(new_pianist)}; adding an album to a pianist with >= 3 "
          f"{spread(new_album)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
