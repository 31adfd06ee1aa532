"""A folder tree of real repertoires for the style judge, to check by hand what it says of
real music (no pianist's recordings ship with the project):

    python benchmarks/real_repertoires.py --jazz ~/jazz-midi --out /tmp/repertoires
    mehldau-train branch=style_judge data=folder data.root=/tmp/repertoires \
        data.group_by=album model=judge_tiny judge.seconds=10 judge.fps=20 \
        judge.target=jazz judge.abstain.families=[random_notes,shuffled_pitches,\
        shuffled_onsets,held_clusters,one_voice,soft_sparse]

`jazz/` is the performances you give (`--jazz`, a MIDI folder: played, with pedal and
touch); `bach/`, `palestrina/` and `monteverdi/` are `--per` scores each from music21's corpus
(Bach chorales, Palestrina masses, Monteverdi madrigals), written to MIDI as music21 plays
them: on the beat, at one velocity. That is why the command leaves out the `quantized`
family: three of the four classes *are* quantized at one velocity, and a family that
describes a real class would teach the abstain class to reject it. Each class is dealt into
six sets (`<class>/set_k/`), so `data.group_by=album` splits by set. Needs music21 (MusPy
installs it).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

COMPOSERS = {"bach": ".mxl", "palestrina": ".krn", "monteverdi": ".mxl"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jazz", type=Path, required=True, help="a folder of performed MIDI")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per", type=int, default=48, help="scores per composer")
    ap.add_argument("--sets", type=int, default=6)
    a = ap.parse_args()
    from music21 import corpus

    from mehldau.metrics import midi_files

    if a.out.exists():
        print(f"{a.out} exists; choose a new --out", file=sys.stderr)
        return 2
    jazz = midi_files([a.jazz])
    for k, f in enumerate(jazz):
        dst = a.out / "jazz" / f"set_{k % a.sets}" / f"{k:03d}{f.suffix.lower()}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    for name, ext in COMPOSERS.items():
        written = 0
        for path in sorted(p for p in corpus.getComposer(name) if str(p).endswith(ext)):
            if written == a.per:
                break
            try:
                score = corpus.parse(path)
                dst = a.out / name / f"set_{written % a.sets}" / f"{written:03d}.mid"
                dst.parent.mkdir(parents=True, exist_ok=True)
                score.write("midi", fp=str(dst))
                written += 1
            except Exception as e:  # noqa: BLE001 (one bad score in a corpus is skipped)
                print(f"skipped {path.name}: {e}", file=sys.stderr)
        print(f"{name}: {written} scores", file=sys.stderr)
    print(f"jazz: {len(jazz)} performances; tree in {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
