"""`mehldau-app app.runs=[runs]`: the listening room, a local web page to sample every
branch, hear it, and judge the branches blind. Gradio is an optional extra."""

from __future__ import annotations

import os
import sys

from omegaconf import OmegaConf

from mehldau.cli.common import compose_or_show, run_cli
from mehldau.errors import UserError

USAGE = """usage: mehldau-app [app.runs=[DIR,...]] [key=value ...]

Serves a page on http://127.0.0.1:7860 (app.port=N) with three tabs: Play (generate from any
run under app.runs, hear it, download the MIDI), Listen (a blind A/B test over a
mehldau-compare output under app.runs) and Results. Needs: pip install -e ".[app]".
Options: app.host app.port app.device app.samples app.max_upload_mb app.min_play_seconds
         app.listen app.soundfont app.show_results; --cfg prints them all."""


def _main(args: list[str]) -> int:
    cfg = compose_or_show("app", args, USAGE)
    if cfg is None:
        return 0
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise UserError('the page needs Gradio: pip install -e ".[app]" (or pip install '
                        '"mehldau[app]")') from e
    from mehldau.app.ui import AppConfig, launch, wait
    from mehldau.settings import checked

    app_cfg = checked(AppConfig, OmegaConf.to_container(cfg.app, resolve=True), "app")
    if not 0 < app_cfg.port < 65536:
        raise UserError(f"app.port must be 1 to 65535, got {app_cfg.port}")
    if app_cfg.max_upload_mb <= 0 or app_cfg.min_play_seconds < 0:
        raise UserError("app.max_upload_mb must be positive and app.min_play_seconds >= 0")
    if app_cfg.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mehldau-app: warning: app.host={app_cfg.host} lets other machines open the page "
              "and generate on this one", file=sys.stderr)
    try:
        _, app = launch(app_cfg, block=False)
    except OSError as e:
        raise UserError(f"cannot serve on {app_cfg.host}:{app_cfg.port} (in use, or not an "
                        "address of this machine); pass another app.port=N or app.host") from e
    runs = app.roots.runs()
    usable = sum(r.usable for r in runs)
    print(f"mehldau-app: serving {usable} usable run(s) of {len(runs)} and "
          f"{len(app.roots.compare_outputs())} comparison(s) under "
          f"{', '.join(str(p) for p in app.roots.roots.values())}")
    print(f"mehldau-app: open http://{app_cfg.host}:{app_cfg.port} (Ctrl-C stops)")
    wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("mehldau-app", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
