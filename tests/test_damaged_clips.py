"""The damage families the judge's "unlike any pianist" class learns from: each keeps what it
says it keeps and breaks what it says it breaks, stays inside the clip and the keyboard, and
is a function of its generator."""

from __future__ import annotations

import numpy as np
import pytest

from mehldau.data.clips import cut_clip, render_clip, windows_after
from mehldau.data.damaged_clips import FAMILIES, check_families, damage
from mehldau.errors import UserError

SECONDS = 10.0


def _clip(seed: int = 0, n: int = 60) -> np.ndarray:
    rng = np.random.default_rng(seed)
    on = np.sort(rng.uniform(0, SECONDS - 0.5, n))
    dur = rng.uniform(0.1, 1.0, n)
    return np.stack([on, on + dur, rng.integers(36, 90, n), rng.integers(40, 110, n)],
                    1).astype(np.float32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_stays_in_the_clip_and_on_the_keys_and_is_seeded(family: str) -> None:
    clip = _clip()
    out = damage(clip, SECONDS, family, np.random.default_rng(1))
    assert out.shape[1] == 4 and len(out) >= 1
    assert (out[:, 0] >= 0).all() and (out[:, 0] < SECONDS).all() and (out[:, 1] > out[:, 0]).all()
    assert out[:, 2].min() >= 21 and out[:, 2].max() <= 108
    assert out[:, 3].min() >= 1 and out[:, 3].max() <= 127
    assert (np.diff(out[:, 0]) >= 0).all()
    again = damage(clip, SECONDS, family, np.random.default_rng(1))
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(render_clip(out, 0, SECONDS, 20),
                              render_clip(clip, 0, SECONDS, 20))  # it changed the music
    assert damage(clip[:0], SECONDS, family, np.random.default_rng(1)).shape[1] == 4


def test_each_family_keeps_what_it_says() -> None:
    clip, rng = _clip(), np.random.default_rng(2)
    out = damage(clip, SECONDS, "random_notes", rng)
    assert len(out) == len(clip)  # the clip's density
    out = damage(clip, SECONDS, "shuffled_pitches", rng)  # rhythm, lengths, touch kept
    np.testing.assert_allclose(np.sort(out[:, 0]), np.sort(clip[:, 0]))
    assert sorted(out[:, 2]) == sorted(clip[:, 2]) and sorted(out[:, 3]) == sorted(clip[:, 3])
    out = damage(clip, SECONDS, "shuffled_onsets", rng)  # the pitch sequence kept, not its time
    assert sorted(out[:, 2]) == sorted(clip[:, 2]) and not np.allclose(out[:, 0], clip[:, 0])
    out = damage(clip, SECONDS, "quantized", rng)  # one grid, one velocity
    steps = np.diff(np.unique(out[:, 0]))
    grid = steps.min()
    assert np.allclose(steps / grid, np.round(steps / grid), atol=1e-3)
    assert len(set(out[:, 3])) == 1
    out = damage(clip, SECONDS, "held_clusters", rng)  # long notes, more of them
    assert len(out) >= 3 * len(clip) * 0.9 and (out[:, 1] - out[:, 0]).min() >= 2.0
    out = damage(clip, SECONDS, "soft_sparse", rng)
    assert len(out) < len(clip) and out[:, 3].mean() < 0.65 * clip[:, 3].mean()
    voices = [damage(clip, SECONDS, "one_voice", np.random.default_rng(k)) for k in range(20)]
    assert any(len(v) <= 3 for v in voices)  # near-silent
    top = max(voices, key=len)  # the top voice: one key at a time
    assert (top[1:, 0] >= top[:-1, 1] - 1e-6).all() and len(top) < len(clip)


def test_a_bad_family_name_is_one_line() -> None:
    with pytest.raises(UserError, match="unknown family 'loud'") as e:
        check_families(["random_notes", "loud"])
    assert "\n" not in str(e.value) and "held_clusters" in str(e.value)
    with pytest.raises(UserError, match="named twice"):
        check_families(["quantized", "quantized"])
    assert check_families([]) == []


def test_one_window_rule_notes_that_start_in_the_window() -> None:
    notes = np.array([[0.0, 3.0, 60, 90], [1.0, 1.5, 62, 80], [2.9, 4.0, 64, 70],
                      [3.0, 3.2, 65, 70]], np.float32)
    clip = cut_clip(notes, 1.0, 2.0)  # [1, 3): the held note from 0 s is not in it
    np.testing.assert_allclose(clip, [[0.0, 0.5, 62, 80], [1.9, 3.0, 64, 70]])
    roll = render_clip(notes, 1.0, 2.0, 10)
    np.testing.assert_array_equal(roll, render_clip(clip, 0.0, 2.0, 10))
    assert not roll[60 - 21].any()  # the note sounding from before is not drawn
    assert roll[64 - 21, 19] > 0  # drawn to the clip's end, not past it
    # the compare's windows after a prompt: whole windows, from the file's time 0
    piece = np.array([[0.5, 1.0, 60, 80], [24.0, 25.0, 60, 80]], np.float32)
    assert windows_after(piece, 5.0, 10.0) == [5.0, 15.0]
    assert windows_after(piece[:1], 5.0, 10.0) == []
    assert windows_after(np.array([[6.0, 8.0, 60, 80]], np.float32), 5.0, 10.0) == [5.0]
