"""The Listen tab's work, without the page: one listener's way through a blind test.

What the browser gets for a trial is three WAV files under random names, each with a random
JUNK chunk so that no two served files share a hash (the page's file cache names files by
content: the same pianist clip in two trials would otherwise carry the same address and
could be recognised). Which system is A and which is B stays in this object, on the server;
the vote names only "A", "B" or "none".

Listening time is counted on the server from the players' play/pause/stop events, and a vote
is accepted only once every clip of the trial has been heard for the minimum time (or to its
end, for a clip shorter than that).
"""

from __future__ import annotations

import os
import secrets
import struct
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

from mehldau.errors import UserError
from mehldau.evaluation.listening import BlindTest, Trial

CLIPS = ("prompt", "A", "B")


def neutral_copy(src: Path, dst_dir: Path) -> Path:
    """`src` (a PCM WAV) under a random name, with a random JUNK chunk so its bytes differ
    from every other copy of it; the audio is unchanged."""
    with wave.open(str(src)) as w:
        params, frames = w.getparams(), w.readframes(w.getnframes())
    fmt = struct.pack("<HHIIHH", 1, params.nchannels, params.framerate,
                      params.framerate * params.nchannels * params.sampwidth,
                      params.nchannels * params.sampwidth, 8 * params.sampwidth)
    junk = secrets.token_bytes(16)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"JUNK" + struct.pack("<I", len(junk)) + junk
            + b"data" + struct.pack("<I", len(frames)) + frames + (b"\0" if len(frames) % 2
                                                                  else b""))
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / f"{secrets.token_hex(8)}.wav"
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    os.replace(tmp, dst)
    return dst


def clip_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / float(w.getframerate())


@dataclass
class ListenSession:
    """One listener on one blind test (kept server-side in the page's session state)."""

    test: BlindTest
    listener: str
    serve_dir: Path
    min_play: float = 5.0
    trials: list[Trial] = field(default_factory=list)
    total: int = 0
    files: dict[str, Path] = field(default_factory=dict)  # clip -> served copy
    needed: dict[str, float] = field(default_factory=dict)
    heard: dict[str, float] = field(default_factory=dict)
    playing: dict[str, float] = field(default_factory=dict)  # clip -> time play started

    @classmethod
    def start(cls, test: BlindTest, listener: str, serve_dir: Path, min_play: float
              ) -> ListenSession:
        s = cls(test, listener, serve_dir, float(min_play))
        s.total = len(test.trials(listener))
        s.trials = test.remaining(listener)
        s._serve()
        return s

    @property
    def trial(self) -> Trial | None:
        return self.trials[0] if self.trials else None

    @property
    def done(self) -> int:
        return self.total - len(self.trials)

    def _serve(self) -> None:
        for old in self.files.values():
            old.unlink(missing_ok=True)
        self.files, self.heard, self.playing, self.needed = {}, {}, {}, {}
        t = self.trial
        if t is None:
            return
        for clip, src in zip(CLIPS, (t.prompt_wav, t.a.wav, t.b.wav)):
            self.files[clip] = neutral_copy(src, self.serve_dir)
            self.heard[clip] = 0.0
            # a clip shorter than the minimum counts as heard when played to its end
            self.needed[clip] = max(min(self.min_play, clip_seconds(src) - 0.25), 0.0)

    def play(self, clip: str, now: float | None = None) -> None:
        if clip in self.files and clip not in self.playing:
            self.playing[clip] = time.monotonic() if now is None else now

    def pause(self, clip: str, now: float | None = None) -> None:
        started = self.playing.pop(clip, None)
        if started is not None:
            self.heard[clip] += (time.monotonic() if now is None else now) - started

    def listened(self, now: float | None = None) -> dict[str, float]:
        now = time.monotonic() if now is None else now
        return {c: round(self.heard.get(c, 0.0) + (now - self.playing[c] if c in self.playing
                                                   else 0.0), 2) for c in self.files}

    def unlocked(self, now: float | None = None) -> bool:
        heard = self.listened(now)
        return bool(self.files) and all(heard[c] >= self.needed[c] for c in self.files)

    def waiting_for(self, now: float | None = None) -> list[str]:
        heard = self.listened(now)
        return [c for c in CLIPS if c in self.files and heard[c] < self.needed[c]]

    def vote(self, choice: str, rating: int | None = None, now: float | None = None) -> dict:
        """Record the vote on the current trial and move to the next one."""
        t = self.trial
        if t is None:
            raise UserError("this blind test is finished; thank you")
        if not self.unlocked(now):
            raise UserError("listen first: play " + ", ".join(self.waiting_for(now))
                            + f" for at least {self.min_play:g} s")
        for clip in list(self.playing):
            self.pause(clip, now)
        record = self.test.record(self.listener, t, choice, rating, self.listened(now))
        self.trials.pop(0)
        self._serve()
        return record
