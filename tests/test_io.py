"""Atomic writes publish files with the modes the user's umask gives, not mkstemp's 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import symusic

from mehldau.io import atomic_dir, atomic_file, atomic_write_midi


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                         (0o077, 0o600, 0o700),
                                                         (0o002, 0o664, 0o775)])
def test_atomic_outputs_honour_the_umask(umask: int, file_mode: int, dir_mode: int,
                                         tmp_path: Path) -> None:
    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "a.json") as f:
            f.write("{}")
        with atomic_dir(tmp_path / "ckpt") as d:
            (d / "weights").write_bytes(b"0")
        score = symusic.Score(480)
        atomic_write_midi(score, tmp_path / "take.mid")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.json") == file_mode
    assert _mode(tmp_path / "take.mid") == file_mode
    assert _mode(tmp_path / "ckpt") == dir_mode
    assert _mode(tmp_path / "ckpt" / "weights") == file_mode
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "a.json") as f:
        f.write("half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
