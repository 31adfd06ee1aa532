"""The Listen tab's work, without the page: one listener's way through a blind test.

Who may listen. A listener code is issued by the server (`BlindTest.issue_codes`), never
typed up by the listener: Start without a code mints one (unless the operator made the test
invite-only), Start with a code resumes it only if this test issued it, and a browser that
already holds a code for the test resumes that one instead of getting another.

What the browser gets for a trial is three WAV files under random names, each with a random
JUNK chunk so that no two served files share a hash (the page's file cache names files by
content: the same pianist clip in two trials would otherwise carry the same address and
could be recognised). Which system is A and which is B stays in this object, on the server;
the vote names only "A", "B" or "none".

How listening is counted. One clip at a time: a play event makes its clip the one counted
and stops the count of any other. The browser reports the player's position (`currentTime`)
on play, on pause or end, and on the page's one-second tick; the clip being counted is
credited, between two reports, the smaller of how far its position moved and how much time
passed on the server's clock. So a backward seek earns nothing, a jump forward no more than
the time it took, a pause that never arrives nothing past the last report, and clips played
together, or positions made up by a script, no more than the wall time spent: the vote
cannot open sooner than for a listener who plays each clip for `min_play` seconds in turn.
"""

from __future__ import annotations

import math
import os
import secrets
import struct
import threading
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

from mehldau.errors import UserError
from mehldau.evaluation.listening import AlreadyVoted, BlindTest, Trial

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
    code: str
    listener: str
    serve_dir: Path
    min_play: float = 5.0
    trials: list[Trial] = field(default_factory=list)
    total: int = 0
    files: dict[str, Path] = field(default_factory=dict)  # clip -> served copy
    lengths: dict[str, float] = field(default_factory=dict)
    needed: dict[str, float] = field(default_factory=dict)
    heard: dict[str, float] = field(default_factory=dict)
    playing: str | None = None  # the one clip being counted
    # clip -> (last position reported, server time of that report, time another clip's play
    # ended its count or None while it is the one counted)
    marks: dict[str, tuple[float, float, float | None]] = field(default_factory=dict)
    # The page runs a session's events on several worker threads (play, pause, tick, vote).
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @classmethod
    def start(cls, test: BlindTest, code: str, serve_dir: Path, min_play: float
              ) -> ListenSession:
        """A session for `code`, which this test must have issued (else a one-line
        UserError)."""
        listener = test.listener_for(code)
        s = cls(test, code, listener, serve_dir, float(min_play))
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

    @property
    def finished(self) -> bool:
        return self.total > 0 and not self.trials

    def close(self) -> None:
        """Delete the copies served for the current trial (the page started another
        session)."""
        with self.lock:
            for served in self.files.values():
                served.unlink(missing_ok=True)
            self.files = {}

    def _serve(self) -> None:
        for old in self.files.values():
            old.unlink(missing_ok=True)
        self.files, self.heard, self.needed, self.lengths = {}, {}, {}, {}
        self.playing, self.marks = None, {}
        t = self.trial
        if t is None:
            return
        for clip, src in zip(CLIPS, (t.prompt_wav, t.a.wav, t.b.wav)):
            self.files[clip] = neutral_copy(src, self.serve_dir)
            self.heard[clip] = 0.0
            self.lengths[clip] = clip_seconds(src)
            # a clip shorter than the minimum counts as heard when played to its end
            self.needed[clip] = max(min(self.min_play, self.lengths[clip] - 0.25), 0.0)

    def _position(self, clip: str, position) -> float | None:
        """A reported position as seconds into the clip, or None where it is not one."""
        if clip not in self.files or isinstance(position, bool):
            return None
        try:
            pos = float(position)
        except (TypeError, ValueError):
            return None
        return min(max(pos, 0.0), self.lengths[clip]) if math.isfinite(pos) else None

    def _credit(self, clip: str, pos: float, now: float) -> None:
        """Credit `clip` for the stretch since its last report, and take this report as the
        next one's start."""
        last, at, until = self.marks[clip]
        wall = (now if until is None else min(now, until)) - at
        self.heard[clip] += max(0.0, min(pos - last, wall))
        self.marks[clip] = (pos, now, until)

    def play(self, clip: str, position, now: float | None = None) -> None:
        """A player started (or went on) playing `clip` at `position` seconds."""
        now = time.monotonic() if now is None else now
        with self.lock:
            pos = self._position(clip, position)
            if pos is None:
                return
            if clip == self.playing:
                self._credit(clip, pos, now)
                return
            if self.playing is not None:  # its count stops here; a late report still counts
                last, at, _ = self.marks[self.playing]  # up to this moment
                self.marks[self.playing] = (last, at, now)
            self.playing = clip
            self.marks[clip] = (pos, now, None)

    def pause(self, clip: str, position, now: float | None = None) -> None:
        """A player paused or reached its end at `position`."""
        now = time.monotonic() if now is None else now
        with self.lock:
            pos = self._position(clip, position)
            if pos is not None and clip in self.marks:
                self._credit(clip, pos, now)
            self.marks.pop(clip, None)
            if clip == self.playing:
                self.playing = None

    def tick(self, positions: dict, now: float | None = None) -> None:
        """The page's periodic report of every player's position; only the clip being
        counted is credited."""
        now = time.monotonic() if now is None else now
        with self.lock:
            if self.playing is None or not isinstance(positions, dict):
                return
            pos = self._position(self.playing, positions.get(self.playing))
            if pos is not None:
                self._credit(self.playing, pos, now)

    def listened(self) -> dict[str, float]:
        return {c: round(self.heard.get(c, 0.0), 2) for c in self.files}

    def unlocked(self) -> bool:
        heard = self.listened()
        return bool(self.files) and all(heard[c] >= self.needed[c] for c in self.files)

    def waiting_for(self) -> list[str]:
        heard = self.listened()
        return [c for c in CLIPS if c in self.files and heard[c] < self.needed[c]]

    def vote(self, choice: str, rating: int | None = None) -> dict | None:
        """Record the vote on the current trial and move to the next one. None where this
        listener had already voted on it (in another window): the trial is skipped."""
        with self.lock:
            t = self.trial
            if t is None:
                raise UserError("this blind test is finished; thank you")
            if not self.unlocked():
                raise UserError("listen first: play " + ", ".join(self.waiting_for())
                                + f" for at least {self.min_play:g} s, one at a time")
            try:
                record = self.test.record(self.listener, t, choice, rating, self.listened())
            except AlreadyVoted:
                record = None
            self.trials.pop(0)
            self._serve()
            return record


def open_session(test: BlindTest, typed: str, held: str, serve_dir: Path, min_play: float
                 ) -> ListenSession:
    """Start or resume: the code typed if any (it must be one this test issued), else the
    code this browser already holds for the test, else a new code, minted here unless the
    test is invite-only. A one-line UserError where none of these applies."""
    typed = (typed or "").strip()
    if typed:
        return ListenSession.start(test, typed, serve_dir, min_play)
    if held:
        try:
            return ListenSession.start(test, held, serve_dir, min_play)
        except UserError:
            if test.invite_only:
                raise
    if test.invite_only:
        raise UserError("this test is invite-only: type the listener code the operator gave "
                        "you, then press Start")
    code = test.issue_codes(1, "page")[0]
    return ListenSession.start(test, code, serve_dir, min_play)
