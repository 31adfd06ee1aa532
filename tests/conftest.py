"""Shared fixtures: MIDI files written by the tests themselves, isolated caches."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import symusic

SHARED = Path(__file__).resolve().parents[2] / "shared"


def write_midi(path: Path, notes: Iterable[tuple[int, float, float, int]], tempo: float = 120.0,
               pedals: Iterable[tuple[float, float]] = ()) -> Path:
    """Write `(pitch, start_s, duration_s, velocity)` notes as a one-track piano MIDI."""
    tpq = 480
    tick = tpq * tempo / 60.0  # ticks per second
    score = symusic.Score(tpq)
    score.tempos.append(symusic.Tempo(0, tempo))
    track = symusic.Track(name="piano", program=0)
    for pitch, start, dur, vel in notes:
        track.notes.append(symusic.Note(int(start * tick), max(int(dur * tick), 1), pitch, vel))
    for start, dur in pedals:
        track.controls.append(symusic.ControlChange(int(start * tick), 64, 127))
        track.controls.append(symusic.ControlChange(int((start + dur) * tick), 64, 0))
    score.tracks.append(track)
    path.parent.mkdir(parents=True, exist_ok=True)
    score.dump_midi(str(path))
    return path


def scale_notes(n: int = 40, base: int = 60, step: float = 0.25, seed: int = 0
                ) -> list[tuple[int, float, float, int]]:
    """A simple deterministic line with chords every bar: enough structure to learn a little."""
    import random

    rng = random.Random(seed)
    notes = []
    for i in range(n):
        t = i * step
        notes.append((base + (i * 2) % 12 + rng.choice((0, 12)), t, step * 0.9, 60 + (i % 4) * 10))
        if i % 4 == 0:
            notes += [(base - 12, t, step * 3.5, 50), (base - 8, t, step * 3.5, 50)]
    return notes


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: intra-op threads cost more than they give, and on a shared
    2-core runner two threads measured 40x slower than one (2.8 s vs 67 ms a VQ-VAE step)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# A production model small enough that a few training steps take well under a second.
MICRO = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
         "model.max_seq_len=64", "model.max_relative_position=32", "train.batch_size=4",
         "train.warmup_steps=2", "train.log_every=2", "train.eval_every=4", "train.ckpt_every=4",
         "logger=none"]
# The scg_diffusion branch at the same scale: 2.56 s samples, a 4 x 4 autoencoder, one block.
SCG_MICRO = ["branch=scg_diffusion", "model.frames=256", "model.autoencoder_frames=64",
             "model.autoencoder.channels=[4,8]", "model.autoencoder.strides=[[2,2],[2,2]]",
             "model.autoencoder.codebook_size=16", "model.dit.hidden_size=32",
             "model.dit.depth=1", "model.dit.num_heads=2", "model.dit.patch_size=[2,8]",
             "train.max_steps=4", "train.batch_size=2", "train.eval_batch_size=4",
             "train.warmup_steps=1", "train.log_every=2", "train.eval_every=4",
             "train.ckpt_every=4", "logger=none"]


def album_names(root: Path, n: int, seed: int = 0) -> list[str]:
    """`n` album folder names for `root` ("set K", K rising) that the default split with
    `split.seed=seed` deals as one test, one val and the rest train. A folder is its own
    stratum, so its split is a hash of its name alone: a few folders named at random often
    deal none to val or test."""
    from mehldau.data.sources import Piece
    from mehldau.data.splits import assign_splits

    wanted, names, k = ["test", "val"] + ["train"] * (n - 2), [], 0
    while wanted:
        name = f"set {k}"
        alone = assign_splits([Piece(name, root / name, f"{root.name}/{name}", name)],
                              seed=seed)[0].split
        if alone in wanted:
            wanted.remove(alone)
            names.append(name)
        k += 1
    return names


def make_folder(root: Path) -> Path:
    """Eight small pieces in four album folders: two train, one val, one test."""
    for a, name in enumerate(album_names(root, 4)):
        for k in range(2):
            write_midi(root / name / f"piece {k}.mid",
                       scale_notes(64, base=52 + 2 * a + k, seed=10 * a + k))
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets the session's cache dir, never the user's ~/.cache."""
    monkeypatch.setenv("MEHLDAU_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    yield
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()


@pytest.fixture
def midi_folder(tmp_path: Path) -> Path:
    """Six small pieces in three album folders plus two loose files; awkward names on purpose."""
    root = tmp_path / "my midi"
    for a in range(3):
        for k in range(2):
            write_midi(root / f"album {a}" / f"tune {k} 'take'.mid",
                       scale_notes(48, base=55 + 3 * a + k, seed=a * 10 + k))
    write_midi(root / "Loose One.MID", scale_notes(40, base=60, seed=99))
    write_midi(root / "loose two.midi", scale_notes(40, base=62, seed=98))
    return root
