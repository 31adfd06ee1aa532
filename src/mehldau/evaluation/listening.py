"""A blind pairwise listening test on a `mehldau-compare` output, and its statistics.

What. Each trial plays a prompt (the first `prompt_seconds` of a reference piece), then two
continuations of it, A and B, and asks which continues it better ("A", "B" or "none"), and
optionally how much the preferred one sounds like the pianist (1..5). The clips are the
compare output's own renders: every compared branch, the pianist's real continuation (the
hidden reference, `pianist`) and a deliberately weak `anchor`. Votes are appended, one JSON
line each, to `<compare dir>/listening/votes.jsonl`; `summarize` turns them into win rates,
Bradley–Terry strengths and intervals, and `mehldau-listen summarize DIR` prints them.

Every clip of a trial is made the same way (`report.excerpt_midi`): notes read with the
sustain pedal folded into their ends, the window cut as the note statistics cut it (notes
that start in it), written with no pedal events, then FluidSynth. A pianist's clip that kept
its CC64 would otherwise sound unlike a generated one, whose pedal is in its note ends.

Why pairwise. Asking "which of two" is easier and more repeatable for untrained listeners
than an absolute score, and a paired design cancels each prompt's difficulty. Per prompt the
design holds every pair of branches, each branch against the pianist, and the anchor against
the pianist; the order of trials and the side each clip is played on are drawn per listener
from a secret salt made once per test (`listening/salt`, readable by its owner only, never
in report.json or sent to a page) and the listener's name: a listener resumes in the same
order, and nobody can work the sides out from what they can read.

Who listens. Listener codes are issued by the test (`issue_codes`: by the page on request,
or by the operator, `mehldau-listen codes`, which can make the test invite-only) and kept,
hashed, in the append-only `listening/codes.jsonl`; a vote names the listener by a hash of
the code, so a summary naming a listener gives nobody their code.

The figures and where they come from:
- win rate (wins + ties / 2) / comparisons;
- Bradley–Terry (1952) strengths, P(i beats j) = p_i / (p_i + p_j), at the maximum of the
  likelihood Hunter (2004) reaches by minorize–maximize, found here by Newton's method;
- 95 % intervals from one percentile bootstrap that resamples listeners and prompts
  together: each resample draws listeners with replacement and, independently, prompts with
  replacement, and weighs each vote by how often its listener times how often its prompt was
  drawn (weights, not duplicated rows, so one resample costs one weighted sum). Votes are
  not independent two ways: a listener's taste runs through all their votes, and a prompt
  that suits one system runs through every listener's votes on it. Resampling listeners
  alone treats the prompts as fixed, and in simulation (tests/test_listening.py: 400 tests
  of 20 listeners and 8 prompts, listeners' and prompts' log-strengths spread by 0.5) its
  95 % intervals held the truth in 78-84 % of tests, Wilson's for the win rates in 69-81 %;
  the two-way bootstrap's held it in 95-98 % (slightly conservative, as resampling both
  ways is: Owen 2007, "The pigeonhole bootstrap"). Win-rate intervals are never narrower
  than Wilson's (1927) score interval, which has width where the resamples have none (a
  rate of 0 or 1 in every one). Every interval is widened where needed to hold its own
  estimate, which can sit at the very edge of the resamples (a system that never wins);
- post-screening with a hidden reference and an anchor, as in MUSHRA (ITU-R BS.1534): a
  listener who prefers the anchor over the pianist too often is set aside, and the summary
  says who and what the figures would be with them.

The anchor is the MUSHRA idea carried over to notes: the pianist's own continuation with its
pitches shuffled among its notes (onsets, durations and velocities kept), so it has the
pianist's rhythm, register and density but no melody or harmony a listener should prefer.

Hand-written: none of the project's dependencies fits a Bradley–Terry model or a Wilson
interval (scipy has neither), and the Newton step on a handful of systems is a few lines.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import math
import os
import random
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path

import numpy as np

from mehldau.errors import UserError
from mehldau.evaluation.distribution import wilson
from mehldau.evaluation.features import Notes, read_notes

PROMPT = "prompt"
REFERENCE = "pianist"
ANCHOR = "anchor"
CHOICES = ("A", "B", "none")
Z95 = 1.959963984540054
# Bradley–Terry prior: one virtual tie of this weight between every two systems. It keeps the
# fit finite when a system never wins (or never loses) and connects the comparison graph
# (Hunter 2004's condition for the maximum to exist); 0.5 of a comparison is small against
# the tens of real ones per pair a test collects.
PSEUDO_TIE = 0.5


# --- the clips: prompt and anchor renders ---------------------------------------------------
def _self_overlaps(onset: np.ndarray, end: np.ndarray, pitches: np.ndarray) -> int:
    """How many notes start while a note of the same pitch still sounds: the clip writer ends
    the earlier one there, so such a note would lose part of the pianist's duration."""
    last: dict[int, float] = {}
    clashes = 0
    for o, e, pitch in zip(onset.tolist(), end.tolist(), pitches.tolist()):  # onset order
        clashes += last.get(pitch, -1.0) > o
        last[pitch] = max(last.get(pitch, -1.0), e)
    return clashes


def notes_midi(notes: Notes, dst: Path) -> None:
    """Notes -> a one-track piano MIDI with no controller events, written atomically: what
    every listening clip is rendered from. Of two notes of one pitch that overlap, the earlier
    ends where the later starts (as a re-struck key stops its string, and as the decoders
    write them), since a MIDI reader cannot tell which note-off ends which."""
    import symusic

    from mehldau.io import atomic_write_midi

    order = np.lexsort((notes.onset - notes.end, notes.onset, notes.pitch))
    onset, end = notes.onset[order], notes.end[order].copy()
    pitch, velocity = notes.pitch[order], notes.velocity[order]
    same = pitch[1:] == pitch[:-1]
    keep = np.ones(len(onset), bool)
    keep[1:] = ~(same & (onset[1:] == onset[:-1]))  # one onset, one pitch: the longest
    onset, end, pitch, velocity = onset[keep], end[keep], pitch[keep], velocity[keep]
    same = pitch[1:] == pitch[:-1]
    end[:-1] = np.where(same, np.minimum(end[:-1], onset[1:]), end[:-1])
    score = symusic.Score(480, ttype="second")
    score.tempos.append(symusic.Tempo(0.0, 120.0, ttype="second"))
    track = symusic.Track(name="Piano", program=0, is_drum=False, ttype="second")
    by_onset = np.lexsort((pitch, onset))
    track.notes = symusic.Note.from_numpy(
        time=onset[by_onset].astype(np.float32),
        duration=(end - onset)[by_onset].astype(np.float32),
        pitch=pitch[by_onset].astype(np.int8),
        velocity=np.clip(velocity[by_onset], 1, 127).astype(np.int8), ttype="second")
    score.tracks.append(track)
    atomic_write_midi(score.to("tick"), dst)


def anchor_midi(pianist_mid: Path, dst: Path, seed: int, prompt: str, draws: int = 200
                ) -> None:
    """The pianist's excerpt with its pitches shuffled among its notes: timing, durations and
    velocities kept, the permutation seeded by (seed, prompt). The notes are read as every
    clip is (pedal folded into note ends) and written by the same writer. Of `draws`
    permutations that change the pitch order (where the notes hold more than one pitch), the
    first with the fewest notes overlapping a note of their own pitch is kept."""
    notes = read_notes(pianist_mid)
    pitches = notes.pitch.tolist()
    rng = random.Random(f"mehldau-anchor:{seed}:{prompt}")
    best, fewest = list(pitches), None
    for _ in range(draws):
        shuffled = rng.sample(pitches, len(pitches))
        if shuffled == pitches and len(set(pitches)) > 1:
            continue
        clashes = _self_overlaps(notes.onset, notes.end, np.asarray(shuffled))
        if fewest is None or clashes < fewest:
            best, fewest = shuffled, clashes
        if clashes == 0:
            break
    notes_midi(Notes(notes.onset, notes.end, np.asarray(best, np.int64), notes.velocity,
                     notes.seconds), dst)


def write_listening_audio(out: Path, prompts: list[dict], prompt_seconds: float,
                          seconds: float, seed: int, font: Path, only_missing: bool = False
                          ) -> list[tuple[str, str, Path]]:
    """`audio/prompt/<p>.wav` (the prompt as the branches got it: `prompts/<p>.mid`, else the
    first `prompt_seconds` of the source) and `audio/anchor/<p>.wav` (from the pianist's
    excerpt `audio/pianist/<p>.mid`, which must be there), cut and written like every other
    clip (`report.excerpt_midi`). Returns (system, prompt, wav) of what exists afterwards."""
    from mehldau.evaluation.report import LISTEN_TAIL, excerpt_midi, render

    made = []
    for p in prompts:
        name = p["name"]
        mid = out / "audio" / PROMPT / f"{name}.mid"
        if not (only_missing and mid.with_suffix(".wav").is_file()):
            cut = out / "prompts" / f"{name}.mid"
            excerpt_midi(cut if cut.is_file() else p["source"], 0.0, prompt_seconds, mid)
            render(mid, mid.with_suffix(".wav"), font, prompt_seconds + LISTEN_TAIL)
        if mid.with_suffix(".wav").is_file():
            made.append((PROMPT, name, mid.with_suffix(".wav")))
        pianist = out / "audio" / REFERENCE / f"{name}.mid"
        mid = out / "audio" / ANCHOR / f"{name}.mid"
        if pianist.is_file() and not (only_missing and mid.with_suffix(".wav").is_file()):
            anchor_midi(pianist, mid, seed, name)
            render(mid, mid.with_suffix(".wav"), font, seconds + LISTEN_TAIL)
        if mid.with_suffix(".wav").is_file():
            made.append((ANCHOR, name, mid.with_suffix(".wav")))
    return made


def _report(compare_dir: Path) -> dict:
    path = compare_dir / "report.json"
    if not path.is_file():
        raise UserError(f"{compare_dir} is not a mehldau-compare output (no report.json)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from e


def _has_controls(mid: Path) -> bool:
    import symusic

    return any(len(t.controls) for t in symusic.Score(str(mid)).tracks)


def prepare(compare_dir: Path, font: Path | None = None) -> None:
    """Bring an older compare output up to the test: write the missing `audio/prompt` and
    `audio/anchor` clips and the pianist's excerpt where it is missing, and re-cut every clip
    an older version cut with its pedal events (the pianist's from its source, a branch's
    from its own clip; its prompt and anchor with it), so every clip of a trial is written
    and rendered alike. Clips already cut this way are kept."""
    from mehldau.evaluation.report import LISTEN_TAIL, SOUNDFONTS, excerpt_midi, render

    compare_dir = Path(compare_dir)
    report = _report(compare_dir)
    if shutil.which("fluidsynth") is None:
        raise UserError("prepare needs the fluidsynth command (Debian: apt-get install "
                        "fluidsynth fluid-soundfont-gm)")
    fonts = [Path(font).expanduser()] if font else [Path(f) for f in SOUNDFONTS]
    font = next((f for f in fonts if f.is_file()), None)
    if font is None:
        raise UserError(f"no soundfont: none of {', '.join(map(str, fonts))} exists; pass one "
                        "(a General MIDI .sf2, Debian: fluid-soundfont-gm)")
    cfg = report.get("config") or {}
    ps, seconds = float(cfg.get("prompt_seconds", 5)), float(cfg.get("seconds", 10))
    seed = int(report.get("seed", cfg.get("seed", 0)))
    audio = compare_dir / "audio"
    for p in report["prompts"]:
        name = p["name"]
        for system in (PROMPT, ANCHOR):  # made again below from what they are cut from
            old = audio / system / f"{name}.mid"
            if old.is_file() and _has_controls(old):
                old.with_suffix(".wav").unlink(missing_ok=True)
        mid = audio / REFERENCE / f"{name}.mid"
        if not mid.is_file() or _has_controls(mid):
            if Path(p["source"]).is_file():
                excerpt_midi(p["source"], ps, seconds, mid)
            elif mid.is_file():
                excerpt_midi(mid, 0.0, seconds, mid)  # the source is gone: fold the old cut
            else:
                print(f"listening: no pianist clip for {name}: {p['source']} is gone",
                      file=sys.stderr)
                continue
            render(mid, mid.with_suffix(".wav"), font, seconds + LISTEN_TAIL)
            (audio / ANCHOR / f"{name}.wav").unlink(missing_ok=True)
        elif not mid.with_suffix(".wav").is_file():
            render(mid, mid.with_suffix(".wav"), font, seconds + LISTEN_TAIL)
        for branch in sorted(d for d in audio.iterdir() if d.is_dir()
                             and d.name not in (PROMPT, ANCHOR, REFERENCE)):
            clip = branch / f"{name}.mid"
            if clip.is_file() and _has_controls(clip):
                excerpt_midi(clip, 0.0, seconds, clip)
                render(clip, clip.with_suffix(".wav"), font, seconds + LISTEN_TAIL)
    write_listening_audio(compare_dir, report["prompts"], ps, seconds, seed, font,
                          only_missing=True)


# --- the test -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clip:
    system: str
    prompt: str
    wav: Path


@dataclass(frozen=True)
class Trial:
    id: str            # the pair, whichever side is shown: "p00:anchor|pianist" (sorted)
    prompt: str
    prompt_wav: Path
    a: Clip            # what this listener hears as A
    b: Clip            # ... as B


def _pair_id(prompt: str, x: str, y: str) -> str:
    return f"{prompt}:{'|'.join(sorted((x, y)))}"


# --- listener codes -------------------------------------------------------------------------
# A code is 64 random bits, shown as four groups of four hex digits; what is stored is its
# SHA-256 (the registry and the votes never hold a code a reader could type in), and the
# listener is named in votes and summaries by the first 12 hex digits of that hash.
CODES = "codes.jsonl"
SALT = "salt"
ISSUERS = ("page", "operator")


def normalize_code(code: str) -> str:
    """A code as typed ("AB12-cd34 ef56 7890") -> its 16 lower-case hex digits, or "" where it
    is not one."""
    text = "".join(str(code or "").split()).replace("-", "").lower()
    return text if len(text) == 16 and all(c in "0123456789abcdef" for c in text) else ""


def _new_code() -> str:
    raw = secrets.token_hex(8)
    return "-".join(raw[i:i + 4] for i in range(0, 16, 4))


def _code_hash(code: str) -> str:
    return hashlib.sha256(f"mehldau-listener:{normalize_code(code)}".encode()).hexdigest()


def listener_of(code: str) -> str:
    """The listener name a code votes under: not the code, so a summary that names a listener
    gives nobody a way to continue their test."""
    return _code_hash(code)[:12]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class BlindTest:
    """The trials of one compare output, its listener codes and the votes cast on them."""

    def __init__(self, compare_dir: Path, systems: list[str], prompts: list[str], seed: int,
                 git_revision: str | None, pairs: list[tuple[str, str, str]]) -> None:
        self.dir = compare_dir
        self.systems = systems        # branches in the report's order, then pianist, anchor
        self.prompts = prompts
        self.seed = seed              # the report's: the anchor's shuffle and the bootstrap
        self.git_revision = git_revision
        self.votes_path = compare_dir / "listening" / "votes.jsonl"
        self.codes_path = compare_dir / "listening" / CODES
        self._pairs = pairs           # (prompt, x, y), x and y sorted: the design
        self._salt_bytes: bytes | None = None

    @classmethod
    def open(cls, compare_dir: str | Path) -> BlindTest:
        compare_dir = Path(compare_dir).expanduser().resolve()
        if not compare_dir.is_dir():
            raise UserError(f"{compare_dir} does not exist")
        report = _report(compare_dir)
        audio = compare_dir / "audio"
        found = sorted(d.name for d in audio.iterdir() if d.is_dir() and d.name != PROMPT
                       and any(d.glob("*.wav"))) if audio.is_dir() else []
        if not found:
            raise UserError(f"no audio in {compare_dir}: rerun mehldau-compare with fluidsynth "
                            "and a soundfont installed, or run mehldau-listen prepare DIR")
        table = report.get("table") or {}
        branches = [n for n in table if n in found and n not in (REFERENCE, ANCHOR)]
        branches += [n for n in found if n not in (*branches, REFERENCE, ANCHOR)]
        systems = branches + [s for s in (REFERENCE, ANCHOR) if s in found]
        if len([s for s in systems if s != ANCHOR]) < 2:
            raise UserError(f"{compare_dir} has audio of {', '.join(systems)} only: a listening "
                            "test needs two systems (a run and the pianist) besides the anchor")
        pairs, prompts = [], []
        for p in (p["name"] for p in report.get("prompts", [])):
            if not (audio / PROMPT / f"{p}.wav").is_file():
                continue
            have = [s for s in systems if (audio / s / f"{p}.wav").is_file()]
            design = [*combinations([b for b in branches if b in have], 2)]
            if REFERENCE in have:
                design += [(b, REFERENCE) for b in branches if b in have]
                design += [(ANCHOR, REFERENCE)] if ANCHOR in have else []
            pairs += [(p, *sorted(xy)) for xy in design]
            if design:
                prompts.append(p)
        if not pairs:
            raise UserError(f"no prompt audio in {compare_dir} (audio/prompt/*.wav): run "
                            "mehldau-listen prepare DIR")
        return cls(compare_dir, systems, prompts, int(report.get("seed", 0)),
                   report.get("git_revision"), pairs)

    def _clip(self, system: str, prompt: str) -> Clip:
        return Clip(system, prompt, self.dir / "audio" / system / f"{prompt}.wav")

    def _salt(self) -> bytes:
        """The test's secret: made once, on the first draw of trials, readable by the owner
        only, never sent anywhere. With it, order and sides cannot be worked out from what a
        listener can see (report.json's seed, their own name)."""
        if self._salt_bytes is None:
            path = self.dir / "listening" / SALT
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{SALT}.tmp-", dir=path.parent)  # 0600
                try:
                    with os.fdopen(fd, "w") as f:
                        f.write(secrets.token_hex(32))
                        f.flush()
                        os.fsync(f.fileno())
                    try:
                        os.link(tmp, path)  # create-once: of two pages racing, one salt wins
                    except FileExistsError:
                        pass
                finally:
                    os.unlink(tmp)
            try:
                self._salt_bytes = bytes.fromhex(path.read_text().strip())
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read the test's secret {path}: {e}; delete it only "
                                "if no listener has started (the trial orders change)") from e
        return self._salt_bytes

    def trials(self, listener: str) -> list[Trial]:
        """Every trial, in an order and with sides drawn from (the test's secret salt,
        listener): the same for a listener each time, different between listeners, and
        unknowable without the salt."""
        digest = hmac.new(self._salt(), listener.encode(), hashlib.sha256).hexdigest()
        rng = random.Random(digest)
        order = list(self._pairs)
        rng.shuffle(order)
        out = []
        for prompt, x, y in order:
            if rng.random() < 0.5:
                x, y = y, x
            out.append(Trial(_pair_id(prompt, x, y), prompt,
                             self.dir / "audio" / PROMPT / f"{prompt}.wav",
                             self._clip(x, prompt), self._clip(y, prompt)))
        return out

    def remaining(self, listener: str) -> list[Trial]:
        """The trials this listener has not voted on, in the same order."""
        votes, _ = read_votes(self.votes_path)
        done = {v["trial"] for v in votes if v["listener"] == listener}
        return [t for t in self.trials(listener) if t.id not in done]

    # --- codes ----------------------------------------------------------------------------
    def _registry(self) -> tuple[dict[str, str], bool]:
        """(code hash -> who issued it, whether the test is invite-only)."""
        issued: dict[str, str] = {}
        invite_only = False
        if self.codes_path.is_file():
            for line in self.codes_path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a torn line: its code was never handed out
                if isinstance(row, dict) and row.get("invite_only") is True:
                    invite_only = True
                elif isinstance(row, dict) and row.get("by") in ISSUERS \
                        and isinstance(row.get("sha256"), str):
                    issued[row["sha256"]] = row["by"]
        return issued, invite_only

    @property
    def invite_only(self) -> bool:
        return self._registry()[1]

    def issue_codes(self, count: int, by: str = "page", invite_only: bool = False
                    ) -> list[str]:
        """`count` new codes, recorded (hashed) in `listening/codes.jsonl` before they are
        returned. By the page ("page") only while the test is not invite-only; by the operator
        ("operator"), with `invite_only` marking the test so from then on."""
        if by not in ISSUERS:
            raise ValueError(f"by must be one of {', '.join(ISSUERS)}, not {by!r}")
        codes = [_new_code() for _ in range(count)]
        rows = [{"sha256": _code_hash(c), "listener": listener_of(c), "by": by,
                 "time": _now()} for c in codes]
        rows += [{"invite_only": True, "time": _now()}] if invite_only else []

        def check(text: str) -> None:
            if by == "page" and any(json.loads(line).get("invite_only") is True
                                    for line in _json_lines(text)):
                raise UserError("this test is invite-only: type the listener code the "
                                "operator gave you")

        _locked_append(self.codes_path, rows, check)
        return codes

    def listener_for(self, code: str) -> str:
        """The listener a code votes as, if this test issued it (and, when invite-only, the
        operator did); else a one-line UserError."""
        issued, invite_only = self._registry()
        by = issued.get(_code_hash(code)) if normalize_code(code) else None
        if by is None:
            raise UserError(f"{str(code).strip()[:40]!r} is not a listener code of this test: "
                            "type the code you were given, or leave the box empty and press "
                            "Start for a new one" + (" (this test is invite-only: ask the "
                                                     "operator)" if invite_only else ""))
        if invite_only and by != "operator":
            raise UserError("this test is invite-only now: codes the page gave out no longer "
                            "open it; type the code the operator gave you")
        return listener_of(code)

    # --- votes ----------------------------------------------------------------------------
    def record(self, listener: str, trial: Trial, choice: str, rating: int | None,
               listened: dict[str, float]) -> dict:
        """Append one vote (one JSON line, under an exclusive lock) and return it. `choice`:
        "A", "B" or "none"; `rating`: None or 1..5, of the preferred clip (None with "none");
        `listened`: seconds each of "prompt", "A", "B" was played (a key left out: 0).
        Bad input raises ValueError; a second vote on the trial, UserError."""
        if not isinstance(listener, str) or not listener.strip() or "\n" in listener:
            raise ValueError(f"bad listener id {listener!r}")
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, not {choice!r}")
        if isinstance(rating, float) and rating.is_integer():
            rating = int(rating)  # a web slider's 4.0
        if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int)
                                   or not 1 <= rating <= 5):
            raise ValueError(f"rating must be a whole number from 1 to 5 or None, not {rating!r}")
        if rating is not None and choice == "none":
            raise ValueError("a rating is of the preferred clip: give none with choice 'none'")
        pair = (trial.prompt, *sorted((trial.a.system, trial.b.system)))
        if pair not in self._pairs or trial.id != _pair_id(*pair):
            raise ValueError(f"trial {trial.id!r} is not one of this test's")
        if set(listened) - {"prompt", "A", "B"}:
            raise ValueError(f"listened takes prompt, A and B, not {sorted(listened)}")
        heard = {}
        for k in ("prompt", "A", "B"):
            v = listened.get(k, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"listened[{k!r}] must be seconds >= 0, not {v!r}")
            heard[k] = float(v)
        winner = {"A": trial.a.system, "B": trial.b.system}.get(choice)
        vote = {"listener": listener, "trial": trial.id, "prompt": trial.prompt,
                "a": trial.a.system, "b": trial.b.system, "choice": choice, "winner": winner,
                "rating": rating, "listened": heard, "time": _now(),
                "git_revision": self.git_revision}

        def check(text: str) -> None:
            for line in _json_lines(text):
                old = json.loads(line)
                if (old.get("listener"), old.get("trial")) == (listener, trial.id):
                    raise AlreadyVoted(f"{listener} already voted on {trial.id}")

        _locked_append(self.votes_path, [vote], check)
        return vote


class AlreadyVoted(UserError):
    """A second vote by one listener on one trial (two tabs, say)."""


def _json_lines(text: str) -> Iterable[str]:
    """The lines of `text` that hold a JSON object (a torn line is passed over)."""
    for line in text.splitlines():
        try:
            if isinstance(json.loads(line), dict):
                yield line
        except ValueError:
            continue


def _locked_append(path: Path, rows: list[dict], check: Callable[[str], None]) -> None:
    """Append `rows`, one JSON line each, after `check` has seen the file as it is and not
    raised. Check and write happen under one exclusive flock, so two writers cannot both pass
    a check the other's write would fail; the lines go out in one write and are fsynced before
    the lock is released, so a reader sees all of them or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        text = os.pread(fd, size, 0).decode("utf-8", "replace") if size else ""
        check(text)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if text and not text.endswith("\n"):  # a torn line from a crash: keep ours apart
            data = "\n" + data
        encoded = data.encode()
        written = os.write(fd, encoded)
        while written < len(encoded):  # a regular file takes it whole; be safe anyway
            written += os.write(fd, encoded[written:])
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


REQUIRED = ("listener", "trial", "prompt", "a", "b", "choice", "winner")


def read_votes(path: Path) -> tuple[list[dict], list[str]]:
    """The valid votes of a votes file, and one message per line skipped (unparseable, a field
    missing, a winner that is not one of its pair, a repeated vote). A missing file is no
    votes."""
    path = Path(path)
    if not path.is_file():
        return [], []
    votes, skipped, seen = [], [], set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for k, line in enumerate(f, 1):
            if not line.strip():
                continue
            why = None
            try:
                v = json.loads(line)
            except ValueError:
                v, why = None, "not JSON (a torn write?)"
            if why is None and not isinstance(v, dict):
                why = "not a JSON object"
            elif why is None and any(key not in v for key in REQUIRED):
                why = f"missing {', '.join(key for key in REQUIRED if key not in v)}"
            elif why is None and (v["choice"] not in CHOICES or v["winner"] != {
                    "A": v["a"], "B": v["b"]}.get(v["choice"])):
                why = "choice and winner disagree"
            elif why is None and (v["listener"], v["trial"]) in seen:
                why = f"a second vote by {v['listener']} on {v['trial']}"
            if why:
                skipped.append(f"{path}:{k}: skipped: {why}")
                continue
            seen.add((v["listener"], v["trial"]))
            votes.append(v)
    return votes, skipped


# --- statistics -----------------------------------------------------------------------------
def _log_likelihood(theta: np.ndarray, w: np.ndarray) -> np.ndarray:
    d = theta[..., :, None] - theta[..., None, :]
    return -(w * np.logaddexp(0.0, -d)).sum((-1, -2))


def bradley_terry(wins: np.ndarray, iters: int = 100, tol: float = 1e-10) -> np.ndarray:
    """Strengths for win matrices `wins[..., i, j]` (i's wins over j, ties as half to each),
    vectorised over any leading axes (bootstrap replicates, simulated tests). Returned on the
    scale of geometric mean 1; a `PSEUDO_TIE` between every two systems is added here.

    The maximum is Hunter's (2004), reached by Newton's method on the log-strengths rather
    than his MM update: the two agree to the tolerance, but MM took thousands of sweeps where
    one system is far weaker than the rest (the anchor), which made a bootstrap of a few
    thousand replicates take seconds; Newton takes about ten. The log-likelihood is concave
    and, with the pseudo tie joining every two systems, strictly so once the scale is fixed,
    so a step that is halved until the likelihood does not fall converges."""
    w = np.asarray(wins, float)
    k = w.shape[-1]
    w = w + (1.0 - np.eye(k)) * PSEUDO_TIE / 2
    n = w + np.swapaxes(w, -1, -2)
    total = w.sum(-1)
    gauge = np.full((k, k), 1.0 / k)  # fixes the free overall scale: sum of log-strengths 0
    theta = np.zeros(w.shape[:-1])
    ll = _log_likelihood(theta, w)
    for _ in range(iters):
        p = 0.5 * (1.0 + np.tanh((theta[..., :, None] - theta[..., None, :]) / 2))
        grad = total - (n * p).sum(-1)
        h = n * p * (1.0 - p)
        hess = h.sum(-1)[..., None] * np.eye(k) - h + gauge  # minus the Hessian, plus gauge
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        t = np.ones(theta.shape[:-1] + (1,))
        for _ in range(60):
            new = theta + t * step
            ll_new = _log_likelihood(new, w)
            worse = ll_new < ll - 1e-12 * np.abs(ll)
            if not worse.any():
                break
            t = np.where(worse[..., None], t / 2, t)
        theta, ll = new - new.mean(-1, keepdims=True), ll_new
        if np.max(np.abs(t * step), initial=0.0) < tol:
            break
    return np.exp(theta)


def bootstrap_weights(rng: np.random.Generator, size: tuple[int, ...], listeners: int,
                      prompts: int, by_prompt: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """How often each listener and each prompt is drawn in each of `size` resamples:
    (weights[*size, listeners], weights[*size, prompts]); the prompts' all 1 when
    `by_prompt` is False (listeners resampled alone)."""
    wl = rng.multinomial(listeners, np.full(listeners, 1 / listeners), size=size)
    wp = (rng.multinomial(prompts, np.full(prompts, 1 / prompts), size=size) if by_prompt
          else np.ones((*size, prompts), int))
    return wl.astype(float), wp.astype(float)


def resample(x: np.ndarray, wl: np.ndarray, wp: np.ndarray) -> np.ndarray:
    """`x[..., L, P, *rest]` (per listener and prompt) summed with the weight
    wl[..., b, l] * wp[..., b, p] of each cell: [..., B, *rest]."""
    rest = "ijk"[:x.ndim - (wl.ndim - 2) - 2]
    return np.einsum(f"...bl,...bp,...lp{rest}->...b{rest}", wl, wp, x, optimize=True)


def percentile_interval(samples: np.ndarray, point: float) -> list[float]:
    """The 95 % percentile interval of `samples`, widened where needed to hold `point`: a
    skewed bootstrap can leave the estimate of the data just outside its own interval, and a
    printed interval that misses its estimate reads as an error."""
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(min(lo, point)), float(max(hi, point))]


def rate_interval(samples: np.ndarray | None, successes: float, n: float
                   ) -> tuple[float, float] | None:
    """A win rate's 95 % interval: the bootstrap's, at least as wide as Wilson's. Votes of one
    listener or on one prompt are not independent, so Wilson's interval alone is too narrow
    (69-81 % coverage in the simulation of tests/test_listening.py); the bootstrap alone has no
    width where every resample gives a rate of 0 or 1."""
    w = wilson(successes, n)
    if w is None or samples is None:
        return w
    ok = samples[np.isfinite(samples)]
    if len(ok) < 0.9 * len(samples):
        return w
    lo, hi = np.percentile(ok, [2.5, 97.5])
    return min(w[0], float(lo)), max(w[1], float(hi))


def _arrays(votes: list[dict], idx: dict[str, int]) -> tuple[list[str], list[str], np.ndarray,
                                                              np.ndarray, np.ndarray]:
    """Per listener and prompt: a win matrix (ties as half a win each) and, per system,
    rating sums and counts."""
    listeners = sorted({v["listener"] for v in votes})
    prompts = sorted({v["prompt"] for v in votes})
    who = {name: i for i, name in enumerate(listeners)}
    where = {name: i for i, name in enumerate(prompts)}
    k = len(idx)
    wins = np.zeros((len(listeners), len(prompts), k, k))
    rsum = np.zeros((len(listeners), len(prompts), k))
    rcnt = np.zeros((len(listeners), len(prompts), k))
    for v in votes:
        cell, a, b = (who[v["listener"]], where[v["prompt"]]), idx[v["a"]], idx[v["b"]]
        if v["winner"] is None:
            wins[cell][a, b] += 0.5
            wins[cell][b, a] += 0.5
        else:
            w = idx[v["winner"]]
            wins[cell][w, b if w == a else a] += 1
            if v.get("rating") is not None:
                rsum[cell][w] += v["rating"]
                rcnt[cell][w] += 1
    return listeners, prompts, wins, rsum, rcnt


def _figures(votes: list[dict], systems: list[str], bootstrap: int, seed: int) -> dict:
    """Per system, per pair and Bradley–Terry figures of `votes`."""
    compared = [s for s in systems if any(s in (v["a"], v["b"]) for v in votes)]
    idx = {s: i for i, s in enumerate(compared)}
    k = len(compared)
    listeners, prompts, wins, rsum, rcnt = _arrays(votes, idx)
    boot_wins = means = None
    if bootstrap > 0 and len(listeners) >= 2:
        wl, wp = bootstrap_weights(np.random.default_rng(seed), (bootstrap,), len(listeners),
                                   len(prompts))
        boot_wins = resample(wins, wl, wp)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = resample(rsum, wl, wp) / resample(rcnt, wl, wp)
            games = boot_wins + np.swapaxes(boot_wins, -1, -2)
            system_rates = boot_wins.sum(-1) / games.sum(-1)
            pair_rates = boot_wins / games

    per_system = {}
    for s in systems:
        mine = [v for v in votes if s in (v["a"], v["b"])]
        won = sum(v["winner"] == s for v in mine)
        ties = sum(v["winner"] is None for v in mine)
        n = len(mine)
        # A tie is half a win, as in the rate itself and in the Bradley–Terry fit.
        ratings = [v["rating"] for v in mine if v["winner"] == s and v.get("rating") is not None]
        rate_ci = rate_interval(system_rates[:, idx[s]] if boot_wins is not None and s in idx
                                 else None, won + ties / 2, n)
        per_system[s] = {"comparisons": n, "wins": won, "ties": ties,
                         "win_rate": (won + ties / 2) / n if n else None,
                         "win_rate_ci": rate_ci, "ratings": len(ratings),
                         "mean_rating": float(np.mean(ratings)) if ratings else None,
                         "mean_rating_ci": None}
        if ratings and means is not None:
            ok = means[:, idx[s]][np.isfinite(means[:, idx[s]])]
            if len(ok) >= 0.9 * bootstrap:
                per_system[s]["mean_rating_ci"] = percentile_interval(
                    ok, per_system[s]["mean_rating"])
    pairs = []
    for x, y in combinations(systems, 2):
        mine = [v for v in votes if {v["a"], v["b"]} == {x, y}]
        if not mine:
            continue
        wx = sum(v["winner"] == x for v in mine)
        wy = sum(v["winner"] == y for v in mine)
        ties = len(mine) - wx - wy
        samples = pair_rates[:, idx[x], idx[y]] if boot_wins is not None else None
        pairs.append({"first": x, "second": y, "comparisons": len(mine), "first_wins": wx,
                      "second_wins": wy, "ties": ties,
                      "first_win_rate": (wx + ties / 2) / len(mine),
                      "first_win_rate_ci": rate_interval(samples, wx + ties / 2, len(mine))})

    bt: dict = {}
    if k >= 2:
        pianist = idx.get(REFERENCE)

        def scaled(p: np.ndarray) -> np.ndarray:  # log-strengths, pianist at 0 if present
            logp = np.log(p)
            return logp - logp[..., [pianist]] if pianist is not None else logp

        point = scaled(bradley_terry(wins.sum((0, 1))))
        boot = scaled(bradley_terry(boot_wins)) if boot_wins is not None else None
        for s, i in idx.items():
            ci = percentile_interval(boot[:, i], float(point[i])) if boot is not None else None
            row = {"log_strength": float(point[i]), "strength": float(np.exp(point[i])),
                   "log_strength_ci": ci}
            if pianist is not None:
                row["p_beats_pianist"] = float(1 / (1 + np.exp(-point[i])))
                row["p_beats_pianist_ci"] = ([float(1 / (1 + np.exp(-c))) for c in ci]
                                             if ci is not None else None)
            bt[s] = row
    return {"votes": len(votes), "listeners": listeners, "systems": per_system,
            "pairs": pairs, "bradley_terry": bt,
            "bt_scale": ("log-strength of pianist = 0" if REFERENCE in idx
                         else "geometric mean of strengths = 1")}


def screen(votes: list[dict], threshold: float = 0.5) -> dict[str, dict]:
    """Per listener with anchor-vs-pianist trials: how often they preferred the anchor (a tie
    counts half: not hearing the anchor as worse is what the screen looks for) and whether
    that reaches `threshold`."""
    out: dict[str, dict] = {}
    for v in votes:
        if {v["a"], v["b"]} != {ANCHOR, REFERENCE}:
            continue
        row = out.setdefault(v["listener"], {"trials": 0, "anchor_preferred": 0.0})
        row["trials"] += 1
        row["anchor_preferred"] += 1.0 if v["winner"] == ANCHOR else (
            0.5 if v["winner"] is None else 0.0)
    for row in out.values():
        row["share"] = row["anchor_preferred"] / row["trials"]
        row["flagged"] = row["share"] >= threshold
    return out


def summarize(votes: list[dict], bootstrap: int = 1000, seed: int = 0,
              anchor_threshold: float = 0.5, systems: Iterable[str] | None = None) -> dict:
    """Win rates, pairs and Bradley–Terry strengths of `votes`, flagged listeners excluded
    (the main figures), and the counts with them included. `systems` (optional): the test's
    systems, so a system nobody compared is listed too."""
    seen = {s for v in votes for s in (v["a"], v["b"])}
    order = list(systems) if systems is not None else []
    rest = sorted(seen - set(order) - {REFERENCE, ANCHOR})
    order += [s for s in (*rest, REFERENCE, ANCHOR) if s in seen and s not in order]
    screening = screen(votes, anchor_threshold)
    flagged = sorted(name for name, row in screening.items() if row["flagged"])
    kept = [v for v in votes if v["listener"] not in flagged]
    listeners = sorted({v["listener"] for v in votes})
    notes = []
    if not votes:
        notes.append("no votes yet")
    elif len({v["listener"] for v in kept}) == 1:
        notes.append("one listener: the Bradley–Terry and rating intervals resample "
                     "listeners and are not given; the win rates' are Wilson's, which take "
                     "the votes as independent")
    if votes and not kept:
        notes.append("every listener was flagged by the anchor screen")
    unscreened = [n for n in listeners if n not in screening]
    if unscreened:
        notes.append(f"{len(unscreened)} listener(s) had no anchor-vs-pianist trial and "
                     "were not screened")
    main = _figures(kept, order, bootstrap, seed)
    never = [s for s in order if not main["systems"][s]["comparisons"]]
    if never and kept:
        notes.append(f"never compared: {', '.join(never)}")
    return {"votes": len(votes), "listeners": len(listeners), "systems": order,
            "bootstrap": bootstrap, "seed": seed, "anchor_threshold": anchor_threshold,
            "pseudo_tie": PSEUDO_TIE, "screening": screening, "flagged": flagged,
            "main": main,
            "with_flagged": _figures(votes, order, bootstrap, seed) if flagged else None,
            "notes": notes}


def _pct(v, ci) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{v:.2f}"


def format_summary(summary: dict) -> str:
    """The summary as Markdown tables: per system, Bradley–Terry, per pair, screening."""
    if not summary["votes"]:
        return "No votes yet: nothing to summarize.\n"
    main = summary["main"]
    kept = len(main["listeners"])
    lines = [f"# Blind listening test: {summary['votes']} votes by {summary['listeners']} "
             f"listeners ({kept} kept, {len(summary['flagged'])} set aside by the anchor "
             "screen)", ""]
    lines += ["| system | comparisons | wins | ties | win rate [95 %] | "
              "mean rating 1-5 [95 % bootstrap] | BT log-strength [95 %] | "
              "P(beats pianist) [95 %] |", "|---" * 8 + "|"]
    for s in summary["systems"]:
        row, bt = main["systems"][s], main["bradley_terry"].get(s, {})
        rating = (_pct(row["mean_rating"], row["mean_rating_ci"]) + f" (n={row['ratings']})"
                  if row["ratings"] else "n/a")
        beats = (_pct(bt.get("p_beats_pianist"), bt.get("p_beats_pianist_ci"))
                 if "p_beats_pianist" in bt and s != REFERENCE else "n/a")
        label = f"*{s}*" if s in (REFERENCE, ANCHOR) else s
        strength = ("0 (the scale's zero)" if s == REFERENCE and bt
                    else _pct(bt.get("log_strength"), bt.get("log_strength_ci")))
        lines.append(f"| {label} | {row['comparisons']} | {row['wins']} | {row['ties']} | "
                     f"{_pct(row['win_rate'], row['win_rate_ci'])} | {rating} | "
                     f"{strength} | {beats} |")
    lines += ["", "| pair (first vs second) | comparisons | first wins | second wins | ties | "
              "first's win rate [95 %] |", "|---" * 6 + "|"]
    for p in main["pairs"]:
        lines.append(f"| {p['first']} vs {p['second']} | {p['comparisons']} | "
                     f"{p['first_wins']} | {p['second_wins']} | {p['ties']} | "
                     f"{_pct(p['first_win_rate'], p['first_win_rate_ci'])} |")
    lines += ["", f"Bradley–Terry scale: {main['bt_scale']}; fitted with a virtual tie of "
              f"weight {summary['pseudo_tie']} between every two systems, so a system that "
              f"never wins still gets a finite strength. Intervals: {summary['bootstrap']} "
              "bootstrap resamples of listeners and prompts together (each drawn with "
              "replacement), the win rates' at least as wide as Wilson's. A tie counts as "
              "half a win everywhere."]
    if summary["flagged"]:
        screening = summary["screening"]
        lines += ["", f"Set aside (preferred the anchor over the pianist in at least "
                  f"{summary['anchor_threshold']:.0%} of their anchor trials): "
                  + ", ".join(f"{n} ({screening[n]['share']:.0%} of "
                              f"{screening[n]['trials']})" for n in summary["flagged"]),
                  "", "With them included:", "",
                  "| system | comparisons | wins | ties | win rate [95 %] |",
                  "|---" * 5 + "|"]
        for s in summary["systems"]:
            row = summary["with_flagged"]["systems"][s]
            lines.append(f"| {s} | {row['comparisons']} | {row['wins']} | {row['ties']} | "
                         f"{_pct(row['win_rate'], row['win_rate_ci'])} |")
    elif summary["screening"]:
        lines += ["", f"Anchor screen: no listener preferred the anchor in "
                  f"{summary['anchor_threshold']:.0%} or more of their anchor trials."]
    lines += [*(["", *(f"Note: {n}." for n in summary["notes"])] if summary["notes"] else [])]
    return "\n".join(lines) + "\n"
