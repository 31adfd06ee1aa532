"""`mehldau-compare runs=[RUN1,RUN2,...] out=DIR`: every branch on the same prompts, seeds
and metrics against the same human reference (see `mehldau.evaluation.compare`)."""

from __future__ import annotations

import sys

from mehldau.cli.common import compose_or_show, run_cli

USAGE = """usage: mehldau-compare runs=[RUN1,RUN2,...] out=DIR [key=value ...]

Options: reference=FOLDER split=test|val prompt_seconds=S max_prompts=K seconds=S
         samples_per_prompt=N seed=N temperature=T top_k=K top_p=P device=auto|cpu|cuda
         likelihood=true|false copy_check=true|false audio=true|false
         judge.run=JUDGE_RUN judge.target=PIANIST (style columns)
--cfg prints the composed configuration and exits."""


def _main(args: list[str]) -> int:
    from mehldau.evaluation.compare import compare

    cfg = compose_or_show("compare", args, USAGE, required=("runs", "out"))
    if cfg is None:
        return 0
    compare(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("mehldau-compare", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
