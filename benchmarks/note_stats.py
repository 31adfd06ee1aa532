"""Note lengths, polyphony and density of generated MIDI against a human reference.

    python benchmarks/note_stats.py --generated out/ --reference ref/ [--start 5 --seconds 30]
    python benchmarks/note_stats.py --generated out/ --reference ref/ \
        --generated-start 5 --reference-start 5 --seconds 30    # continuations of 5 s prompts

Prints, for both sets, notes per second, mean polyphony (notes sounding where any sounds),
the median note length and the share of notes longer than 2 s, pooled over each set's spans
(`mehldau.metrics`), and generated / reference. Notes are read with the sustain pedal folded
into their ends, as every tokenizer here reads them. `--json` prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

from mehldau.metrics import comparison_table, midi_files, note_stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generated", nargs="+", required=True, help="MIDI files or folders")
    ap.add_argument("--reference", nargs="+", required=True, help="MIDI files or folders")
    ap.add_argument("--start", type=float, default=0.0, help="span start in both sets (s)")
    ap.add_argument("--generated-start", type=float, default=None)
    ap.add_argument("--reference-start", type=float, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="span length (default: all)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    gen, ref = midi_files(a.generated), midi_files(a.reference)
    for name, files in (("--generated", gen), ("--reference", ref)):
        if not files:
            print(f"note_stats: error: no MIDI files in {name}; pass files or folders",
                  file=sys.stderr)
            return 2
    g = note_stats(gen, a.start if a.generated_start is None else a.generated_start, a.seconds)
    r = note_stats(ref, a.start if a.reference_start is None else a.reference_start, a.seconds)
    if a.json:
        print(json.dumps({"generated": g.to_dict(), "reference": r.to_dict()}, indent=2))
    else:
        print(comparison_table(g, r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
