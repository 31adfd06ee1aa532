"""`mehldau-train [key=value ...]`: compose the Hydra config and hand it to the branch's recipe.

The core never imports a branch by name: the chosen `branch` config says which recipe module
to load (`branch.recipe`), and that module's `train(cfg)` does the rest.

A single run composes with Hydra's compose API, so every expected mistake is one line and
exit 2, before any directory exists. `-m`/`--multirun` hands the command to Hydra's own app:
its sweeper expands `key=a,b` overrides and its launcher runs the jobs (the basic launcher in
this process; `hydra/launcher=joblib` or `submitit_slurm` when that plugin is installed), each
job in its own run directory with Hydra's `.hydra/` record of its config and overrides.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mehldau.cli.common import compose_or_show, config_dir, finalize, run_cli
from mehldau.errors import UserError
from mehldau.recipes.run import check_settings

USAGE = """usage: mehldau-train [--cfg] [-m] [key=value ...]

Train a branch (default: production, tiny preset, on the embedded demo corpus).
Examples:
  mehldau-train run_dir=runs/demo
  mehldau-train data=folder data.root=~/midi model=base train.max_steps=20000
  mehldau-train data=pijama data.root=~/pijama data.pianist="Brad Mehldau"
  mehldau-train run_dir=runs/demo train.resume=true
  mehldau-train -m model=tiny,base train.lr=1e-4,3e-4   # a sweep: one run directory per job
--cfg prints the composed configuration and exits."""


def load_recipe(cfg: DictConfig):
    try:
        return importlib.import_module(cfg.branch.recipe)
    except ModuleNotFoundError as e:
        raise UserError(f"branch '{cfg.branch.name}' has no recipe module {cfg.branch.recipe}; "
                        "is the package installed with `pip install -e .`?") from e


def _train(cfg: DictConfig) -> Path:
    if cfg.model.get("branch") not in (None, cfg.branch.name):
        raise UserError(f"model preset '{cfg.model.get('preset')}' is for branch "
                        f"'{cfg.model.branch}', not '{cfg.branch.name}'; pick a "
                        f"{cfg.branch.name} preset")
    check_settings(cfg)  # typed and in range, before any data is listed or read
    run_dir = Path(load_recipe(cfg).train(cfg))
    print(f"mehldau-train: done; run directory {run_dir}", file=sys.stderr)
    return run_dir


def _main(args: list[str]) -> int:
    if "-m" in args or "--multirun" in args:
        return _multirun([a for a in args if a not in ("-m", "--multirun")])
    cfg = compose_or_show("train", args, USAGE)
    if cfg is None:
        return 0
    run_dir = _train(cfg)
    from accelerate import PartialState

    if PartialState().is_main_process:  # one record for a run of several processes
        _record(run_dir, cfg, args)
    return 0


def _record(run_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """What Hydra's app writes for each job, for single runs too: `.hydra/config.yaml` (the
    composed config) and `.hydra/overrides.yaml` (the command line)."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), hydra_dir / "overrides.yaml")


def _multirun(args: list[str]) -> int:
    import hydra
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    failed: list[str] = []

    def job(cfg: DictConfig) -> None:
        hc = HydraConfig.get()
        if cfg.run_dir is None:  # each job's run directory is its Hydra output directory
            cfg.run_dir = hc.runtime.output_dir
        finalize(cfg)
        try:
            _train(cfg)
        except UserError as e:  # one job's mistake is reported, and the sweep goes on
            print(f"mehldau-train: error: job {hc.job.num} ({' '.join(hc.overrides.task)}): "
                  f"{e}", file=sys.stderr)
            failed.append(str(hc.job.num))

    GlobalHydra.instance().clear()
    app = hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(job)
    argv = sys.argv
    sys.argv = ["mehldau-train", "--multirun", *args]
    try:
        app()
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
    if failed:
        raise UserError(f"{len(failed)} job(s) failed: {', '.join(failed)} (errors above)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("mehldau-train", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
