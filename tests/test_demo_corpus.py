"""The embedded demo corpus: size, determinism, readability and the musical properties promised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import symusic

from mehldau.data.demo import DEMO_VERSION, write_demo_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_demo_corpus(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(scope="module")
def scores(corpus: list[Path]) -> dict[Path, symusic.Score]:
    return {p: symusic.Score(str(p)) for p in corpus}


def test_layout(corpus: list[Path]) -> None:
    assert isinstance(DEMO_VERSION, int)
    assert corpus == sorted(corpus) and len(corpus) >= 40
    assert all(p.is_file() and p.suffix == ".mid" for p in corpus)
    sets = {p.parent.name for p in corpus}
    assert len(sets) == 8 and all(s.startswith("set_") for s in sets)
    assert {p.parent.parent for p in corpus} == {corpus[0].parent.parent}
    # Atomic writes leave nothing else behind.
    root = corpus[0].parent.parent
    assert sorted(p for p in root.rglob("*") if p.is_file()) == corpus


def test_total_duration(scores: dict[Path, symusic.Score]) -> None:
    seconds = [s.to("second").end() for s in scores.values()]
    assert sum(seconds) >= 30 * 60
    assert min(seconds) >= 30 and max(seconds) <= 90


def test_same_seed_same_bytes_other_seed_differs(corpus: list[Path], tmp_path: Path) -> None:
    again = write_demo_corpus(tmp_path / "again", seed=0)
    other = write_demo_corpus(tmp_path / "other", seed=1)
    assert [p.relative_to(p.parents[1]) for p in again] == \
        [p.relative_to(p.parents[1]) for p in corpus]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(corpus, again))
    assert sum(a.read_bytes() != b.read_bytes() for a, b in zip(corpus, other)) == len(corpus)


def test_pretty_midi_reads_every_file(corpus: list[Path]) -> None:
    for p in corpus:
        pm = pretty_midi.PrettyMIDI(str(p))
        assert pm.instruments, p
        for inst in pm.instruments:
            assert inst.program == 0 and not inst.is_drum
        assert sum(len(i.notes) for i in pm.instruments) > 100, p
        assert pm.time_signature_changes and pm.get_tempo_changes()[1].size >= 1


def test_tempo_and_meters(scores: dict[Path, symusic.Score]) -> None:
    meters = [(s.time_signatures[0].numerator, s.time_signatures[0].denominator)
              for s in scores.values()]
    assert meters.count((3, 4)) >= 5
    assert meters.count((5, 4)) >= 3
    assert meters.count((4, 4)) > len(meters) / 2
    qpm = [s.tempos[0].qpm for s in scores.values()]
    assert min(qpm) < 90 and max(qpm) > 180 and all(55 <= q <= 230 for q in qpm)


def test_pedal_in_most_pieces(scores: dict[Path, symusic.Score]) -> None:
    def pedalled(s: symusic.Score) -> bool:
        values = [c.value for t in s.tracks for c in t.controls if c.number == 64]
        return any(v >= 64 for v in values) and any(v < 64 for v in values)

    assert sum(pedalled(s) for s in scores.values()) >= 0.7 * len(scores)


def test_two_hands(scores: dict[Path, symusic.Score]) -> None:
    for p, s in scores.items():
        notes = [n for t in s.tracks for n in t.notes]
        low = [n.velocity for n in notes if n.pitch < 60]
        high = [n.velocity for n in notes if n.pitch >= 67]
        assert len(low) > 50 and len(high) > 50, p
        assert np.mean(low) < np.mean(high), p  # the comping sits under the line
        assert all(36 <= n.pitch <= 96 and 1 <= n.velocity <= 127 for n in notes), p


def test_right_hand_swings(scores: dict[Path, symusic.Score]) -> None:
    checked = 0
    for p, s in scores.items():
        if s.time_signatures[0].numerator != 4:
            continue
        tpq = s.ticks_per_quarter
        frac = np.array([(n.time % tpq) / tpq for t in s.tracks for n in t.notes if n.pitch >= 67])
        offbeat = frac[(frac > 0.4) & (frac < 0.8)]  # straight eighths would centre on 0.5
        assert len(offbeat) >= 20, p
        assert 0.56 < np.median(offbeat) < 0.72, p
        checked += 1
    assert checked >= 20
