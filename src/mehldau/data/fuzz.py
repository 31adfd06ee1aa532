"""Corrupted MIDI files, for checking that the data pipeline skips what it cannot use and
never crashes (`tests/test_fuzz_midi.py`, `benchmarks/fuzz_midi.py`).

The bytes are written by hand rather than through symusic or mido: a MIDI library writes
valid files only, and the point is files no library would write. Each corruption takes a
valid file (`valid_midi`) and a seed; `KINDS` names them.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable


def _vlq(n: int) -> bytes:
    """MIDI's variable-length quantity (7 bits a byte, high bit = more)."""
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(out))


def _chunk(tag: bytes, body: bytes, length: int | None = None) -> bytes:
    return tag + struct.pack(">I", len(body) if length is None else length) + body


def midi_file(tracks: list[bytes], fmt: int = 1, division: int = 480) -> bytes:
    """A Standard MIDI File from track bodies (events without the end-of-track meta)."""
    head = _chunk(b"MThd", struct.pack(">HHH", fmt, len(tracks), division))
    return head + b"".join(_chunk(b"MTrk", t + b"\x00\xff\x2f\x00") for t in tracks)


def notes_track(notes: list[tuple[int, int, int, int]], tempo_us: int = 500_000) -> bytes:
    """(delta ticks, pitch, velocity, length ticks) notes, one after another, on channel 0."""
    body = b"\x00\xff\x51\x03" + tempo_us.to_bytes(3, "big")
    for delta, pitch, velocity, length in notes:
        body += _vlq(delta) + bytes([0x90, pitch, velocity])
        body += _vlq(length) + bytes([0x80, pitch, 0])
    return body


def valid_midi(seed: int = 0, n: int = 24) -> bytes:
    """A short, valid piano piece: a seeded walk of notes."""
    rng = random.Random(seed)
    pitch, notes = 60, []
    for _ in range(n):
        pitch = min(max(pitch + rng.choice((-3, -2, 2, 3, 5, -5)), 36), 96)
        notes.append((rng.choice((0, 120, 240)), pitch, rng.randint(40, 110),
                      rng.choice((120, 240, 480))))
    return midi_file([notes_track(notes)])


def _truncated(rng: random.Random) -> bytes:
    data = valid_midi(rng.randrange(1 << 16))
    return data[: rng.randrange(len(data))]


def _random_bytes(rng: random.Random) -> bytes:
    body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
    return (b"MThd" if rng.random() < 0.5 else b"") + body


def _bad_chunk_length(rng: random.Random) -> bytes:
    track = notes_track([(0, 60, 80, 240), (240, 64, 80, 240)])
    length = rng.choice((0, 1, len(track) // 2, len(track) + 100, 0xFFFFFFFF))
    head = _chunk(b"MThd", struct.pack(">HHH", 1, 1, 480))
    return head + _chunk(b"MTrk", track + b"\x00\xff\x2f\x00", length)


def _zero_division(rng: random.Random) -> bytes:
    return midi_file([notes_track([(0, 60, 80, 240), (240, 62, 80, 240)])], division=0)


def _absurd_tempo(rng: random.Random) -> bytes:
    tempo = rng.choice((0, 1, 0xFFFFFF))  # 0 us per beat, 1 us, or 16.7 s per beat
    return midi_file([notes_track([(0, 60, 80, 240), (240, 62, 80, 240)], tempo_us=tempo)])


def _chord_10k(rng: random.Random) -> bytes:
    body = b"".join(b"\x00" + bytes([0x90, 21 + i % 88, 1 + i % 127]) for i in range(10_000))
    offs = [bytes([0x80, 21 + i, 0]) for i in range(88)]
    return midi_file([body + b"\x83\x60" + b"\x00".join(offs)])  # all released 480 ticks on


def _type_2(rng: random.Random) -> bytes:
    return midi_file([notes_track([(0, 60, 80, 240)]), notes_track([(0, 67, 80, 240)])], fmt=2)


def _huge_delta(rng: random.Random) -> bytes:
    return midi_file([notes_track([(0, 60, 80, 240), (0x0FFFFFFF, 62, 80, 0x0FFFFFFF)])])


def _pitch_past_127(rng: random.Random) -> bytes:
    # a data byte >= 0x80 is read as a status byte: the stream falls out of step
    body = b"\x00\x90" + bytes([rng.randrange(128, 256), 80]) + b"\x83\x60\x80\x3c\x00"
    return midi_file([body])


def _flipped_bytes(rng: random.Random) -> bytes:
    data = bytearray(valid_midi(rng.randrange(1 << 16)))
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def _empty(rng: random.Random) -> bytes:
    return b"" if rng.random() < 0.5 else midi_file([b""])


KINDS: dict[str, Callable[[random.Random], bytes]] = {
    "truncated": _truncated,
    "random_bytes": _random_bytes,
    "bad_chunk_length": _bad_chunk_length,
    "zero_division": _zero_division,
    "absurd_tempo": _absurd_tempo,
    "chord_10k": _chord_10k,
    "type_2": _type_2,
    "huge_delta": _huge_delta,
    "pitch_past_127": _pitch_past_127,
    "flipped_bytes": _flipped_bytes,
    "empty": _empty,
}


def corrupt(kind: str, seed: int) -> bytes:
    """The bytes of one corrupted file of `kind` (one of `KINDS`)."""
    return KINDS[kind](random.Random(seed))
