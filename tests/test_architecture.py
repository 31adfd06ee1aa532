"""The import graph's layers, read from the source: the core never imports a branch, a branch
never imports another branch, and a branch imports only the recipe components of its own
paradigm (token models: `recipes.autoregressive` and `recipes.adapt`; diffusion: neither)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BRANCHES = ("production", "perceiver_mt", "moonbeam_lora", "scg_diffusion")
TOKEN_ONLY = ("mehldau.recipes.autoregressive", "mehldau.recipes.adapt")


def imports(path: Path) -> set[str]:
    """Every module a file imports statically (`from a import b` counts as a and a.b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_graph_is_read() -> None:
    # The parser sees what the layers rest on, so the checks below cannot pass vacuously.
    production = imports(ROOT / "branches/production/recipe.py")
    assert "mehldau.recipes.autoregressive" in production
    assert "mehldau.nn.music_transformer" in production


def test_the_core_never_imports_a_branch() -> None:
    core = sorted((ROOT / "src/mehldau").rglob("*.py"))
    assert len(core) > 40
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imports(p)
                                                  if m.startswith(("mehldau.branches",
                                                                   "branches")))
                 for p in core}
    assert {p: m for p, m in offenders.items() if m} == {}


@pytest.mark.parametrize("branch", BRANCHES)
def test_a_branch_imports_no_other_branch_and_only_its_paradigm(branch: str) -> None:
    files = sorted((ROOT / "branches" / branch).rglob("*.py"))
    assert files
    used = set().union(*(imports(p) for p in files))
    others = [b for b in BRANCHES if b != branch]
    assert not [m for m in used if any(m.startswith((f"mehldau.branches.{b}", f"branches.{b}"))
                                       for b in others)]
    if branch == "scg_diffusion":
        assert not [m for m in used if m.startswith(TOKEN_ONLY)]
