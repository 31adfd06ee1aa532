"""Corrupt MIDI at volume: N corrupted files (`mehldau.data.fuzz`, every kind in turn) and a
few good ones through the corpus pipeline (parse, validate, tokenize) with each tokenizer.

    python benchmarks/fuzz_midi.py                # 10,000 files, every tokenizer
    python benchmarks/fuzz_midi.py --files 1000 --tokenizers duration

Prints, per tokenizer, files tried, kept, skipped, crashes (an exception that escaped the
pipeline for one file; the goal is 0) and files per second, then the commonest skip reasons.
Exit status 1 if anything crashed or a good file was not kept.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from mehldau.data.corpus import tokenize_pieces
from mehldau.data.fuzz import KINDS, corrupt, valid_midi
from mehldau.data.sources import folder_source
from mehldau.tokenize.base import build_tokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000, help="corrupted files (default 10000)")
    ap.add_argument("--good", type=int, default=20, help="valid files mixed in (default 20)")
    ap.add_argument("--tokenizers", nargs="+",
                    default=["performance", "duration", "moonbeam", "pianoroll"])
    a = ap.parse_args()
    kinds = sorted(KINDS)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "midi"
        root.mkdir()
        for i in range(a.files):
            kind = kinds[i % len(kinds)]
            (root / f"bad_{i:05d}_{kind}.mid").write_bytes(corrupt(kind, i))
        for i in range(a.good):
            (root / f"good_{i:03d}.mid").write_bytes(valid_midi(seed=i))
        pieces = folder_source(root, group_by="file")
        print(f"{len(pieces)} files ({a.files} corrupted over {len(kinds)} kinds, {a.good} good)")
        print(f"{'tokenizer':<12} {'tried':>6} {'kept':>6} {'skipped':>8} {'crashes':>8} "
              f"{'files/s':>8}")
        for name in a.tokenizers:
            tokenizer = build_tokenizer(name, {})
            kept, reasons, crashes = [], Counter(), []
            t0 = time.perf_counter()
            for piece in pieces:  # one at a time, so one crash does not hide the next
                try:
                    ok, skipped, _ = tokenize_pieces([piece], tokenizer, None)
                except Exception as e:  # noqa: BLE001 (counting crashes is the point)
                    crashes.append(f"{piece.path.name}: {type(e).__name__}: {e}")
                    continue
                kept += [p.path.name for p, _ in ok]
                reasons.update(re.sub(r"\b(\d[\d.]*|inf)\b", "N", r.split(" (")[0])
                               for _, r in skipped)
            dt = time.perf_counter() - t0
            print(f"{name:<12} {len(pieces):>6} {len(kept):>6} {sum(reasons.values()):>8} "
                  f"{len(crashes):>8} {len(pieces) / dt:>8.0f}")
            lost = [f"good_{i:03d}.mid" for i in range(a.good)
                    if f"good_{i:03d}.mid" not in kept]
            for line in crashes[:5]:
                print(f"  crash: {line}")
            if lost:
                print(f"  good files not kept: {', '.join(lost[:5])}")
            failed |= bool(crashes or lost)
            common = ", ".join(f"{r} ({n})" for r, n in reasons.most_common(4))
            print(f"  commonest skip reasons: {common}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
