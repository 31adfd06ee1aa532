"""From pieces to validated, tokenized, cached, split sequences.

Every file goes through a real MIDI parser (symusic, the library under miditok; it reads some
files that pretty_midi rejects). Unreadable, empty or absurd files are skipped and listed
one per line in `skipped.tsv`; one bad file never stops a run and none is dropped silently.
Tokenized pieces are cached on disk keyed by (file content hash, tokenizer config hash), so a
second run over the same folder tokenizes nothing; skip verdicts are cached the same way.
Splits come with the pieces (assigned over the source's catalogue before anything is parsed),
so a file skipped by one tokenizer and kept by another moves no other piece's split.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import symusic
from tqdm.auto import tqdm

from mehldau.data.sources import Piece
from mehldau.data.splits import SPLITS, by_split, write_manifest
from mehldau.errors import UserError
from mehldau.io import atomic_file
from mehldau.tokenize.base import Tokenizer

MAX_SECONDS = 3600.0
MAX_NOTES = 200_000


class BadMidi(Exception):
    """A file that cannot be used; the message is the reason written to skipped.tsv."""


@dataclass
class Corpus:
    splits: dict[str, list[tuple[Piece, np.ndarray]]]
    skipped: list[tuple[Piece, str]] = field(default_factory=list)
    from_cache: int = 0
    hashes: dict[str, str] = field(default_factory=dict)  # piece id -> file content hash

    def sequences(self, split: str) -> list[np.ndarray]:
        return [seq for _, seq in self.splits[split]]


def read_score(path: str | Path) -> symusic.Score:
    """Parse and sanity-check one MIDI file; raise `BadMidi(reason)` if it is not usable."""
    path = Path(path)
    if not path.is_file():
        raise BadMidi("file not found")
    try:
        score = symusic.Score(str(path))
    except Exception as e:  # symusic raises plain RuntimeError/ValueError with a reason
        raise BadMidi(f"unreadable MIDI ({str(e).splitlines()[0][:120]})") from e
    n_notes = score.note_num()
    if n_notes == 0:
        raise BadMidi("no notes")
    if n_notes > MAX_NOTES:
        raise BadMidi(f"{n_notes} notes, more than {MAX_NOTES}")
    seconds = score.to("second").end()
    if seconds > MAX_SECONDS:
        raise BadMidi(f"{seconds / 3600:.1f} h long, more than 1 h")
    return score


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:24]


def tokenize_pieces(
    pieces: list[Piece], tokenizer: Tokenizer, cache_dir: str | Path | None, desc: str = "tokenize",
    hashes: dict[str, str] | None = None,
) -> tuple[list[tuple[Piece, np.ndarray]], list[tuple[Piece, str]], int]:
    """Tokenize every piece (from cache where possible). Returns (ok, skipped, n_from_cache);
    `hashes`, when given, receives each readable file's content hash by piece id."""
    cache = Path(cache_dir).expanduser() / "tokens" / tokenizer.config_hash() if cache_dir else None
    ok, skipped, hits = [], [], 0
    for piece in tqdm(pieces, desc=desc, unit="file", leave=False, disable=None):
        try:
            if not piece.path.is_file():
                raise BadMidi("file not found")
            key = file_hash(piece.path)
            if hashes is not None:
                hashes[piece.id] = key
            npy = cache / key[:2] / f"{key}.npy" if cache else None
            bad = npy.with_suffix(".skip") if npy else None
            cached = _cached_tokens(npy) if npy is not None else None
            if cached is not None:
                ok.append((piece, cached))
                hits += 1
                continue
            if bad is not None and bad.exists():
                hits += 1
                raise BadMidi(bad.read_text().strip())
            try:
                tokens = _encode(tokenizer, read_score(piece.path))
            except BadMidi as e:
                if bad is not None:
                    with atomic_file(bad) as f:
                        f.write(str(e) + "\n")
                raise
            if npy is not None:
                with atomic_file(npy, "wb") as f:
                    np.save(f, tokens)
            ok.append((piece, tokens))
        except BadMidi as e:
            skipped.append((piece, str(e)))
    return ok, skipped, hits


def _encode(tokenizer: Tokenizer, score: symusic.Score) -> np.ndarray:
    """Tokens of a parsed score; a tokenizer's failure on one odd file is that file's skip
    reason, not the end of the run."""
    try:
        tokens = tokenizer.encode(score)
    except Exception as e:  # noqa: BLE001 (any failure on one file skips that file)
        raise BadMidi(f"the {tokenizer.name} tokenizer failed on it ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120] if str(e) else ''})") from e
    if len(tokens) == 0:
        raise BadMidi("no notes in the piano range")
    return tokens


def _cached_tokens(npy: Path) -> np.ndarray | None:
    """A cache entry, or None when it is missing or unreadable (then it is rewritten)."""
    if not npy.exists():
        return None
    try:
        return np.load(npy, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None


def write_skipped(skipped: list[tuple[Piece, str]], path: str | Path) -> None:
    with atomic_file(path) as f:
        f.write("id\tpath\treason\n")
        for piece, reason in skipped:
            f.write(f"{piece.id}\t{piece.path}\t{reason}\n")


def build_corpus(
    pieces: list[Piece],
    tokenizer: Tokenizer,
    run_dir: str | Path | None,
    cache_dir: str | Path | None,
    rule: dict | None = None,
    quiet: bool = False,
) -> Corpus:
    """Validate and tokenize (cached) pieces whose splits are set; write skipped.tsv and the
    manifest splits.json (`rule`: how the splits were made, recorded in it). `quiet`: no
    summary line (the other processes of a multi-process run)."""
    hashes: dict[str, str] = {}
    ok, skipped, hits = tokenize_pieces(pieces, tokenizer, cache_dir, hashes=hashes)
    if not ok:
        raise UserError(
            f"none of the {len(pieces)} MIDI files could be used (first reason: "
            f"{skipped[0][1] if skipped else 'none'}); check data.root"
        )
    seqs = {p.id: s for p, s in ok}
    splits = by_split([p for p, _ in ok])
    corpus = Corpus({k: [(p, seqs[p.id]) for p in v] for k, v in splits.items()}, skipped, hits)
    corpus.hashes = hashes
    notes = [(p, n) for p, s in ok if (n := tokenizer.encode_note(s)) is not None]
    if run_dir is not None:
        run_dir = Path(run_dir)
        write_skipped(skipped, run_dir / "skipped.tsv")
        manifest = write_manifest([p for p, _ in ok], run_dir / "splits.json", rule, hashes)
        titles = manifest["titles_in_several_splits"]
        if titles:
            print(f"warning: {len(titles)} tune titles are played in more than one split (the "
                  f"same standard on two albums, e.g. '{next(iter(titles))}'); listed in "
                  f"{run_dir / 'splits.json'}", file=sys.stderr)
        if notes:  # kept, but changed by the tokenizer (e.g. split at long silences)
            write_skipped(notes, run_dir / "changed.tsv")
    sizes = ", ".join(f"{k} {len(corpus.splits[k])}" for k in SPLITS)
    msg = f"data: {len(ok)} pieces ({hits} from cache; {sizes}), skipped {len(skipped)}"
    if skipped and run_dir is not None:
        msg += f" (see {Path(run_dir) / 'skipped.tsv'})"
    if notes:
        msg += f"; {len(notes)} kept but changed, e.g. {notes[0][1]}"
        if run_dir is not None:
            msg += f" (see {Path(run_dir) / 'changed.tsv'})"
    if not quiet:
        print(msg, file=sys.stderr)
    return corpus


def unigram_entropy(sequences: list[np.ndarray], vocab_size: int) -> float:
    """Entropy in nats/token of the corpus's token frequencies: the no-context baseline."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for s in sequences:
        counts += np.bincount(s.reshape(-1), minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
