"""`mehldau-listen summarize DIR`: the blind listening test's figures for a compare output.

The votes are those a listening page wrote with `mehldau.evaluation.listening.BlindTest`
into `DIR/listening/votes.jsonl`; the figures go to the terminal and, atomically, to
`DIR/listening/summary.json`. `mehldau-listen prepare DIR` adds the prompt and anchor clips
that compare outputs written before the test existed lack. `mehldau-listen codes DIR --count N`
issues N listener codes for the operator to hand out and makes the test invite-only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mehldau.cli.common import run_cli
from mehldau.errors import UserError

USAGE = """usage: mehldau-listen summarize DIR [--bootstrap N] [--threshold X] [--json]
       mehldau-listen prepare DIR [--soundfont FILE]
       mehldau-listen codes DIR --count N

DIR is a mehldau-compare output. summarize prints win rates and Bradley-Terry strengths with
95 % intervals (bootstrap over listeners and prompts) and the anchor screen, and writes
DIR/listening/summary.json. --bootstrap N: resamples (default 1000); --threshold X: set aside a
listener who preferred the anchor over the pianist in at least this share of their anchor
trials (default 0.5); --json: print the summary as JSON. prepare renders the prompt and anchor
clips an older compare output lacks, and re-cuts clips cut with their pedal events (needs
fluidsynth and a General MIDI soundfont). codes prints N new listener codes, one a line, and
makes the test invite-only: from then on the page gives out no codes and opens the test only
with a code issued this way (one a person; run it again for more)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through run_cli, not argparse's usage dump
        raise UserError(f"{message} (mehldau-listen -h shows the usage)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mehldau-listen", add_help=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("summarize", add_help=False)
    s.add_argument("dir")
    s.add_argument("--bootstrap", type=int, default=1000)
    s.add_argument("--threshold", type=float, default=0.5)
    s.add_argument("--json", action="store_true")
    q = sub.add_parser("prepare", add_help=False)
    q.add_argument("dir")
    q.add_argument("--soundfont", default=None)
    c = sub.add_parser("codes", add_help=False)
    c.add_argument("dir")
    c.add_argument("--count", type=int, required=True)
    return p


def _codes(args: argparse.Namespace) -> None:
    from mehldau.evaluation import listening

    if not 1 <= args.count <= 10000:
        raise UserError(f"--count must be 1 to 10000, got {args.count}")
    test = listening.BlindTest.open(args.dir)
    codes = test.issue_codes(args.count, by="operator", invite_only=True)
    print("\n".join(codes))
    print(f"mehldau-listen: {len(codes)} code(s) issued; {test.dir} is invite-only: the page "
          "opens it only with a code issued this way", file=sys.stderr)


def _summarize(args: argparse.Namespace) -> None:
    from mehldau.evaluation import listening
    from mehldau.io import atomic_file

    if args.bootstrap < 0 or not 0 < args.threshold <= 1:
        raise UserError("--bootstrap must be >= 0 and --threshold in (0, 1]")
    test = listening.BlindTest.open(args.dir)
    votes, skipped = listening.read_votes(test.votes_path)
    for line in skipped:
        print(f"mehldau-listen: {line}", file=sys.stderr)
    if not votes:
        raise UserError(f"no votes yet in {test.votes_path}")
    summary = listening.summarize(votes, args.bootstrap, test.seed, args.threshold,
                                  systems=test.systems)
    summary.update(compare_dir=str(test.dir), git_revision=test.git_revision,
                   skipped_lines=skipped)
    with atomic_file(test.dir / "listening" / "summary.json") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1) if args.json else listening.format_summary(summary),
          end="\n" if args.json else "")


def _main(argv: list[str]) -> int:
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0 if argv else 2
    args = _parser().parse_args(argv)
    if args.command == "codes":
        _codes(args)
    elif args.command == "prepare":
        from mehldau.evaluation.listening import prepare

        prepare(Path(args.dir), Path(args.soundfont) if args.soundfont else None)
        print(f"mehldau-listen: prompt and anchor clips are in {Path(args.dir) / 'audio'}")
    else:
        _summarize(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("mehldau-listen", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
