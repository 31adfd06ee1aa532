"""What a trained autoregressive run plays, measured against the held-out human performances.

    python benchmarks/continuations.py --run runs/mine --out /tmp/cont
    python benchmarks/continuations.py --run runs/mine --out /tmp/cont --split val \
        --prompt-seconds 5 --seconds 30 --unprompted 6 --set temperature=0.9

Reads `<run>/splits.json`, and for every piece of the split (test by default) continues its
first `--prompt-seconds` for `--seconds` with `mehldau-generate` (seed 0, the generate
defaults unless `--set key=value` overrides them), then draws `--unprompted` samples of
`--seconds` from nothing. Prints `mehldau.metrics.note_stats` of the continuations (their
generated part only) against the same span of the human performances, and of the unprompted
samples against the performances' first `--seconds`. The generated files stay in `--out`
(prompted/, unprompted/) for listening and plotting. Works for production, perceiver_mt and
moonbeam_lora runs; the count of notes closed by the `max_note_seconds` cut is summed from
mehldau-generate's output.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from mehldau.metrics import comparison_table, note_stats

_CUT = re.compile(r": (\d+) notes, .* (\d+) closed by the max_note_seconds cut")


def generate(args: list[str]) -> tuple[int, int]:
    """Run mehldau-generate; returns (notes written, notes closed by the cut)."""
    out = subprocess.run([sys.executable, "-m", "mehldau.cli.generate", *args],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"continuations: mehldau-generate failed:\n{out.stderr[-2000:]}")
    found = [tuple(map(int, m.groups())) for m in _CUT.finditer(out.stderr)]
    return sum(n for n, _ in found), sum(c for _, c in found)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run directory with splits.json")
    ap.add_argument("--out", required=True, help="folder for the generated MIDI")
    ap.add_argument("--split", default="test")
    ap.add_argument("--prompt-seconds", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--unprompted", type=int, default=6)
    ap.add_argument("--set", nargs="*", default=[], help="extra mehldau-generate overrides")
    a = ap.parse_args()
    try:
        pieces = json.loads((Path(a.run) / "splits.json").read_text())[a.split]["pieces"]
    except (OSError, ValueError, KeyError) as e:
        print(f"continuations: error: cannot read the {a.split} split of {a.run} ({e}); pass "
              "a run directory written by mehldau-train", file=sys.stderr)
        return 2
    refs = [Path(p["path"]) for p in pieces]
    out = Path(a.out)
    total = cut = 0
    prompted = []
    for i, ref in enumerate(refs):
        path = out / "prompted" / f"{i:02d}_{re.sub(r'[^A-Za-z0-9]+', '_', ref.stem)}.mid"
        n, c = generate([f"ckpt={a.run}", f"out={path}", f"prompt={ref}",
                         f"prompt_seconds={a.prompt_seconds}", f"seconds={a.seconds}", *a.set])
        total, cut = total + n, cut + c
        prompted.append(path)
    print(f"== {len(refs)} continuations of {a.prompt_seconds:g} s prompts ({a.split} split), "
          f"span {a.prompt_seconds:g}..{a.prompt_seconds + a.seconds:g} s")
    print(comparison_table(note_stats(prompted, a.prompt_seconds, a.seconds),
                           note_stats(refs, a.prompt_seconds, a.seconds)))
    if a.unprompted:
        path = out / "unprompted" / "sample.mid"
        n, c = generate([f"ckpt={a.run}", f"out={path}", f"seconds={a.seconds}",
                         f"num_samples={a.unprompted}", *a.set])
        total, cut = total + n, cut + c
        free = sorted(path.parent.glob("sample*.mid"))
        print(f"== {len(free)} unprompted samples, span 0..{a.seconds:g} s")
        print(comparison_table(note_stats(free, 0.0, a.seconds),
                               note_stats(refs, 0.0, a.seconds)))
    print(f"notes closed by the max_note_seconds cut: {cut} of {total} "
          f"({100 * cut / max(total, 1):.2f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
