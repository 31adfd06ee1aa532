"""The package installs anywhere: a wheel built from the repository carries the branches and
the configs inside `mehldau`, and runs from another directory with nothing of the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import MICRO, make_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_runs_train_from_another_directory(tmp_path: Path) -> None:
    # build from a copy, so the checkout gets no build/ or egg-info
    src = tmp_path / "src_copy"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for part in ("src", "branches", "configs"):
        shutil.copytree(REPO / part, src / part, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist),
                    str(src)], check=True, capture_output=True)
    wheel = next(dist.glob("mehldau-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"mehldau/configs/train.yaml", "mehldau/configs/branch/production.yaml",
            "mehldau/branches/production/recipe.py", "mehldau/py.typed"} <= names
    assert not any(n.startswith("branches/") for n in names)  # no top-level `branches`

    # installed into a fresh venv; its dependencies come from this environment's
    # site-packages through a .pth line (which does not run this environment's own .pth
    # files, so the editable checkout stays invisible)
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    deps = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (site / "environment_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", str(wheel)], check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    make_folder(work / "data")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MEHLDAU_CONFIG_DIR", "PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(python), *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)

    where = run("-c", "import mehldau, mehldau.cli.common as c; print(mehldau.__file__); "
                      "print(c.config_dir())")
    assert where.returncode == 0, where.stderr
    module, configs = where.stdout.split()
    assert module.startswith(str(site)) and configs.startswith(str(site))
    # the console script the wheel installs
    shown = subprocess.run([str(venv / "bin" / "mehldau-train"), "--cfg"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=600)
    assert shown.returncode == 0 and "recipe: mehldau.branches.production.recipe" in shown.stdout
    trained = run("-m", "mehldau.cli.train", "data=folder", f"data.root={work / 'data'}",
                  f"run_dir={work / 'run'}", "train.max_steps=5", *MICRO)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (work / "run" / "checkpoints" / "step_0000005" / "model.safetensors").is_file()
