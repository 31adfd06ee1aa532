"""What both entry points share: composing Hydra configs and turning user errors into one line.

We call Hydra's compose API instead of `@hydra.main` so that every expected mistake (an
unknown branch or preset, a missing required key, a bad override) becomes a one-line message
and exit status 2, with no traceback and no output directory created first. The config tree,
groups, defaults lists and override grammar are Hydra's, unchanged.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mehldau.errors import UserError


def config_dir() -> Path:
    """`$MEHLDAU_CONFIG_DIR`, else the config tree installed with the package (`mehldau.configs`:
    the repository's `configs/` in an editable install, a copy inside a wheel)."""
    env = os.environ.get("MEHLDAU_CONFIG_DIR")
    if env:
        return Path(env).expanduser().resolve()
    from importlib.resources import files

    try:
        tree = Path(str(files("mehldau.configs")))
    except ModuleNotFoundError:
        tree = None
    if tree is None or not (tree / "train.yaml").is_file():
        raise UserError("cannot find mehldau's configs; reinstall mehldau (pip install .) or set "
                        "MEHLDAU_CONFIG_DIR to a copy of its configs/ folder")
    return tree


def finalize(cfg: DictConfig) -> None:
    """Resolve interpolations and fill the defaults that depend on the machine."""
    OmegaConf.resolve(cfg)
    if "cache_dir" in cfg and cfg.cache_dir is None:
        cfg.cache_dir = str(Path("~/.cache/mehldau").expanduser())


def compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=list(overrides))
        finalize(cfg)
    except HydraException as e:
        msg = str(e) or str(e.__cause__ or "") or type(e).__name__
        raise UserError(_one_line_hydra_error(msg)) from e
    except OmegaConfBaseException as e:
        raise UserError(f"bad configuration: {str(e).splitlines()[0]}") from e
    return cfg


def compose_or_show(config_name: str, args: Sequence[str], usage: str,
                    required: Sequence[str] = ()) -> DictConfig | None:
    """Compose from `key=value` args; handle `-h/--help` and `--cfg` (print and return None);
    then a one-line error for each `required` key left `???`."""
    if any(a in ("-h", "--help") for a in args):
        print(usage)
        return None
    cfg = compose(config_name, [a for a in args if a != "--cfg"])
    if "--cfg" in args:
        print(OmegaConf.to_yaml(cfg))
        return None
    require(cfg, *required)
    return cfg


def _one_line_hydra_error(msg: str) -> str:
    m = re.search(r"Could not find '([^/']+)/([^']+)'", msg)
    if m:
        group, option = m.groups()
        # `<branch>_default` entries only point each branch at its default preset.
        opts = [o for o in re.findall(r"^\t(\S+)$", msg, flags=re.M)
                if not o.endswith("_default")]
        known = f"; choose one of: {', '.join(opts)}" if opts else ""
        return f"unknown {group} '{option}'{known}"
    key = re.search(r"Could not override '([^']+)'", msg) or \
        re.search(r"Key '([^']+)' is not in struct", msg)
    if key:
        return (f"unknown option '{key.group(1)}'; check the spelling (`--cfg` prints every "
                "option) or add it with +key=value")
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    return " ".join(lines[:2])


def require(cfg: DictConfig, *keys: str) -> None:
    """A one-line error for `???` values the user must give."""
    for key in keys:
        if OmegaConf.is_missing(cfg, key) if "." not in key else _missing(cfg, key):
            raise UserError(f"{key} is required: add {key}=... to the command")


def _missing(cfg: DictConfig, dotted: str) -> bool:
    parent, _, leaf = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent)
    return node is None or OmegaConf.is_missing(node, leaf)


def run_cli(prog: str, body: Callable[[list[str]], int | None], argv: list[str] | None = None
            ) -> int:
    """Run `body(args)`; expected errors print `prog: error: ...` and return 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(body(args) or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
