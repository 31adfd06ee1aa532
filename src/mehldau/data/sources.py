"""Where pieces come from: a MIDI folder, PiJAMA as published, the embedded demo corpus, or
the synthetic pianists corpus (invented players for the style judge's tests and demos).

Every source yields `Piece`s with a stable id and a *group* key. Splits are made by group so
that no album (PiJAMA), session folder, or family of versions of one tune ends up on both
sides of an evaluation. Each source assigns splits over its whole catalogue before it filters
or parses anything (see `splits.py`), so a piece's split is the same in every run.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mehldau.errors import UserError

MIDI_SUFFIXES = {".mid", ".midi"}

# Columns of PiJAMA's metadata table that the loader needs (the real table has more).
PIJAMA_COLUMNS = ("id", "artist", "album", "title", "midi_filepath")


@dataclass(frozen=True)
class Piece:
    id: str  # stable across runs: a path relative to the source root, or PiJAMA's id
    path: Path
    group: str  # pieces sharing a group never go to different splits
    style: str = ""  # pianist (PiJAMA) or top-level folder: style tokens and split strata
    split: str = "train"  # set by the source from its whole catalogue (splits.assign_splits)
    title: str = ""  # the tune, normalised (tune_key): the same standard on two albums


def tune_key(stem: str, pattern: str | None = None) -> str:
    """The part of a file stem that names the tune, so versions of one tune group together.

    With `pattern`, its first capture group (or whole match). Without, a normalisation that
    drops parenthesised credits, anything after a dash, words like solo/trio, digits, case
    and punctuation: "Spring Is Here 2 (K Barron)", "Spring Is Here - Bill Evans chords" and
    "Spring Is Here" all give "springishere".
    """
    if pattern is not None:
        m = re.search(pattern, stem)
        if m is None:
            return stem
        return (m.group(1) if m.groups() else m.group(0)).strip().lower()
    s = re.sub(r"\(.*?\)", " ", stem.lower())
    s = re.split(r"\s-|-", s)[0]
    s = re.sub(r"\b(solo|trio|piano|take|version|v\d+)\b", " ", s)
    return re.sub(r"[^a-z]+", "", s) or stem.lower()


def folder_source(
    root: str | Path, group_by: str = "top_dir", group_regex: str | None = None,
    ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
) -> list[Piece]:
    """All `.mid`/`.midi` files under `root` (recursive, any case), split from the listing
    (before any file is parsed, so a skipped file never moves another's split).

    `group_by`:
      - "top_dir": the top-level subdirectory a file sits in; a file directly in the root is
        its own group (so a flat folder still splits);
      - "album": a `pianist/album` tree: a file's first two folders ("ada/01_first"); a file
        with only one folder above it is grouped by that folder, a file in the root is its
        own group;
      - "file": every file is its own group;
      - "regex": files whose stems give the same `tune_key` share a group: the first capture
        group (or the whole match) of `group_regex`, or, without one, a normalised title, so
        "Spring Is Here.mid" and "Spring Is Here 2.mid" stay together.
    A group's name starts with the folder's own name ("jazz/album 1"), so two folders'
    "album 1" stay two groups when one run's manifest is checked against another's.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}; set data.root to a folder of MIDI files")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MIDI_SUFFIXES
    )
    if not files:
        raise UserError(
            f"no .mid/.midi files under {root}; point data.root at a folder that has some"
        )
    if group_by not in ("top_dir", "album", "file", "regex"):
        raise UserError(f"unknown data.group_by '{group_by}'; use top_dir, album, file or regex")
    pieces = []
    for p in files:
        rel = p.relative_to(root)
        top = rel.parts[0] if len(rel.parts) > 1 else ""
        if group_by == "top_dir":
            group = top or rel.as_posix()
        elif group_by == "album":
            group = "/".join(rel.parts[:min(2, len(rel.parts) - 1)]) or rel.as_posix()
        elif group_by == "file":
            group = rel.as_posix()
        else:
            group = tune_key(p.stem, group_regex)
        group = f"{root.name}/{group}"
        pieces.append(Piece(id=rel.as_posix(), path=p, group=group, style=top or root.name,
                            title=tune_key(p.stem)))
    from mehldau.data.splits import assign_splits  # splits needs Piece: imported here

    return assign_splits(pieces, ratios, seed)


def pijama_source(
    root: str | Path, csv_path: str | Path | None = None, pianist: str | None = "Brad Mehldau",
    ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
) -> list[Piece]:
    """PiJAMA as published: its metadata CSV plus the MIDI tree it points to.

    `root` is the folder that holds the unzipped MIDI (the CSV's `midi_filepath` values look
    like `data/midi/<condition>/<artist>/<album>/<title>.midi`; they are resolved against
    `root`, then against `root`'s parent, and finally with a leading `data/` stripped, so
    both the repository layout and a bare unzip work). The group is artist + album, never
    PiJAMA's own per-file `split` column, which puts most albums in several splits. Splits
    are dealt over every album in the CSV, stratified by pianist, before `pianist` filters.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"PiJAMA folder not found: {root}; set data.root to the unzipped PiJAMA")
    csv_path = Path(csv_path).expanduser() if csv_path else _find_pijama_csv(root)
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except OSError as e:
        raise UserError(f"cannot read PiJAMA CSV {csv_path}: {e.strerror}") from e
    missing = [c for c in PIJAMA_COLUMNS if c not in header]
    if missing:
        raise UserError(
            f"{csv_path} lacks PiJAMA columns {', '.join(missing)}; "
            "pass the published pijama.csv as data.csv"
        )
    from mehldau.data.splits import assign_splits  # splits needs Piece: imported here

    catalogue = assign_splits([
        Piece(id=f"pijama-{r['id']}", path=Path(r["midi_filepath"]),
              group=f"{r['artist']} / {r['album']}", style=r["artist"],
              title=tune_key(r["title"])) for r in rows], ratios, seed)
    if pianist:
        catalogue = [p for p in catalogue if p.style == pianist]
        if not catalogue:
            raise UserError(f"no PiJAMA rows for pianist '{pianist}'; check data.pianist spelling")
    return [replace(p, path=_resolve_pijama_path(root, str(p.path))) for p in catalogue]


def _find_pijama_csv(root: Path) -> Path:
    for cand in (root / "pijama.csv", root.parent / "pijama.csv", root / "data" / "pijama.csv"):
        if cand.is_file():
            return cand
    raise UserError(f"no pijama.csv in or beside {root}; pass its path as data.csv")


def _resolve_pijama_path(root: Path, rel: str) -> Path:
    rel_path = Path(rel)
    candidates = [root / rel_path, root.parent / rel_path]
    if rel_path.parts and rel_path.parts[0] == "data":
        candidates.append(root / Path(*rel_path.parts[1:]))
    if len(rel_path.parts) > 2 and rel_path.parts[:2] == ("data", "midi"):
        candidates.append(root / Path(*rel_path.parts[2:]))
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]  # missing: reported as skipped by the corpus builder


def demo_source(cache_root: str | Path, seed: int = 0, ratios: Sequence[float] = (0.8, 0.1, 0.1),
                split_seed: int = 0) -> list[Piece]:
    """The embedded demo corpus, synthesized once into `cache_root` and reused."""
    from mehldau.data.demo import DEMO_VERSION, write_demo_corpus

    root = Path(cache_root).expanduser() / f"demo-v{DEMO_VERSION}-seed{seed}"
    done = root / ".complete"
    if not done.exists():
        write_demo_corpus(root, seed=seed)
        done.write_text("ok\n")
    from mehldau.data.splits import assign_fixed

    # The demo never grows (a new DEMO_VERSION is a new corpus), so its sets are dealt to
    # meet the ratios (6/1/1 of its 8) rather than hashed one by one (`assign_fixed`).
    return assign_fixed(folder_source(root, group_by="top_dir", ratios=ratios, seed=split_seed),
                        ratios, split_seed)


def pianists_source(cache_root: str | Path, seed: int = 0,
                    ratios: Sequence[float] = (0.8, 0.1, 0.1), split_seed: int = 0,
                    pianist: str | None = None) -> list[Piece]:
    """The synthetic pianists corpus (`demo.PIANISTS`, invented players), synthesized once
    into `cache_root` and reused. `Piece.style` is the pianist and a group is one of their
    albums, so splits are dealt per pianist over their albums (four albums each: one val,
    one test, two train). `pianist` keeps one player's pieces, after the splits are dealt."""
    from mehldau.data.demo import PIANISTS, PIANISTS_VERSION, write_pianist_corpus

    if pianist is not None and pianist not in PIANISTS:
        raise UserError(f"unknown data.pianist '{pianist}'; the synthetic pianists are "
                        f"{', '.join(PIANISTS)} (or null for all)")
    root = Path(cache_root).expanduser() / f"pianists-v{PIANISTS_VERSION}-seed{seed}"
    done = root / ".complete"
    if not done.exists():
        write_pianist_corpus(root, seed=seed)
        done.write_text("ok\n")
    pieces = folder_source(root, group_by="album", ratios=ratios, seed=split_seed)
    return [p for p in pieces if pianist is None or p.style == pianist]


def pieces_from_config(data: DictConfig, cache_dir: str | Path,
                       ratios: Sequence[float] = (0.8, 0.1, 0.1), split_seed: int = 0
                       ) -> list[Piece]:
    """The pieces named by a `data` config group (demo, pianists, folder or pijama), each with
    its split from the source's whole catalogue (`ratios` train/val/test, `split_seed`)."""
    source = data.get("source")
    ratios = tuple(ratios)
    if source == "demo":
        return demo_source(cache_dir, seed=int(data.get("seed", 0)), ratios=ratios,
                           split_seed=split_seed)
    if source == "pianists":
        return pianists_source(cache_dir, seed=int(data.get("seed", 0)), ratios=ratios,
                               split_seed=split_seed, pianist=data.get("pianist"))
    if source in ("folder", "pijama"):
        root = None if OmegaConf.is_missing(data, "root") else data.get("root")
        if root in (None, ""):
            raise UserError(f"data.root is required for data={source}: add data.root=PATH")
        if source == "folder":
            return folder_source(root, data.get("group_by", "top_dir"), data.get("group_regex"),
                                 ratios, split_seed)
        return pijama_source(root, data.get("csv"), data.get("pianist"), ratios, split_seed)
    raise UserError(f"unknown data source '{source}'; use data=demo, data=pianists, data=folder "
                    "or data=pijama")
