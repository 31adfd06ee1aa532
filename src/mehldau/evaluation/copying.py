"""Copy check: how long a stretch of a generated continuation occurs verbatim in the training set.

The counterweight to the overlap area of `distribution`: a model that replays its training
pieces scores a perfect OA. A note sequence becomes a sequence of symbols, one per note after
the first: (pitch interval to the previous note, IOI bin), chords read bottom up (`symbols`).
That is transposition- and time-shift-invariant, and coarse enough in time that a replay
through the 10 ms token grid still matches in long runs (an IOI within 5 ms of a bin edge can
change bin and cut a run there).

IOI bin edges in seconds: 0.03 0.06 0.1 0.15 0.22 0.33 0.5 0.75 1.1 1.6, i.e. 11 bins, the
first (< 30 ms) meaning "struck together" (a chord), each next about 1.5x wider, everything
over 1.6 s one bin.

Hand-written: the task (longest common substring against a corpus) is a few lines with
rolling hashes, and no music library does it on this representation. The caller passes only
the continuation: a prompt taken from a training piece would match by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mehldau.evaluation.features import Notes

IOI_EDGES = np.array([0.03, 0.06, 0.1, 0.15, 0.22, 0.33, 0.5, 0.75, 1.1, 1.6])
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible mod 2**64
_BASE_INV = np.uint64(pow(int(_BASE), -1, 2**64))
_CACHED_LENGTHS = 64


def symbols(notes: Notes) -> np.ndarray:
    """Symbol i links note i to note i + 1: (interval + 128) * 16 + IOI bin + 1, as uint64.

    Notes less than 30 ms after the previous one join its chord, and a chord is read bottom
    up, its notes all at the chord's first onset: the order of a chord's notes in (onset,
    pitch) order is timing jitter, which a replay through a 10 ms token grid reshuffles."""
    if len(notes) < 2:
        return np.zeros(0, np.uint64)
    gap = np.diff(notes.onset)
    cluster = np.concatenate([[0], np.cumsum(gap >= IOI_EDGES[0])])
    onset = notes.onset[np.r_[0, np.flatnonzero(gap >= IOI_EDGES[0]) + 1]][cluster]
    order = np.lexsort((notes.pitch, cluster))
    interval = np.diff(notes.pitch[order].astype(np.int64)) + 128
    ioi = np.digitize(np.diff(onset[order]), IOI_EDGES)
    return (interval * 16 + ioi + 1).astype(np.uint64)  # +1: no symbol is 0


def _powers(base: np.uint64, n: int) -> np.ndarray:
    p = np.full(n, base, np.uint64)
    p[0] = 1
    return np.cumprod(p, dtype=np.uint64)  # wraps mod 2**64, as intended


def _prefix(s: np.ndarray) -> np.ndarray:
    """P[i] = sum_{j<i} s[j] * B**j mod 2**64, so a window's hash is (P[i+k] - P[i]) * B**-i."""
    with np.errstate(over="ignore"):
        return np.concatenate([[np.uint64(0)], np.cumsum(s * _powers(_BASE, len(s)),
                                                         dtype=np.uint64)])


def _window_hashes(prefix: np.ndarray, inv: np.ndarray, k: int, starts: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (prefix[starts + k] - prefix[starts]) * inv[starts]


class TrainIndex:
    """The symbol sequences of the training pieces, with per-length sets of window hashes built
    on demand: the longest match is found by binary search on the length, since a run that
    matches contains shorter runs that match."""

    def __init__(self, pieces: Sequence[Notes]):
        seqs = [symbols(p) for p in pieces if len(p) > 1]
        self.seq = np.concatenate(seqs) if seqs else np.zeros(0, np.uint64)
        # end of the piece each position belongs to: windows must not span two pieces
        self.piece_end = np.repeat(np.cumsum([len(s) for s in seqs]), [len(s) for s in seqs])
        self.longest_piece = max((len(s) for s in seqs), default=0)
        self.prefix = _prefix(self.seq)
        self.inv = _powers(_BASE_INV, len(self.seq) + 1)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _windows(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted hashes of every length-k window of the training set, and where each starts."""
        if k not in self._cache:
            if len(self._cache) >= _CACHED_LENGTHS:
                self._cache.pop(next(iter(self._cache)))
            starts = np.flatnonzero(np.arange(len(self.seq)) + k <= self.piece_end)
            h = _window_hashes(self.prefix, self.inv, k, starts)
            order = np.argsort(h)
            self._cache[k] = h[order], starts[order]
        return self._cache[k]

    def _matches(self, s: np.ndarray, k: int) -> np.ndarray:
        """Start positions in s of the length-k windows that occur in the training set (hash
        hits are checked symbol by symbol, so a collision cannot create a match)."""
        if k > len(s) or k > self.longest_piece:
            return np.zeros(0, np.int64)
        hashes, where = self._windows(k)
        starts = np.arange(len(s) - k + 1)
        h = _window_hashes(_prefix(s), _powers(_BASE_INV, len(s) + 1), k, starts)
        pos = np.minimum(np.searchsorted(hashes, h), len(hashes) - 1)
        hit = np.flatnonzero(hashes[pos] == h)
        ok = [i for i in hit if np.array_equal(s[i:i + k], self.seq[where[pos[i]]:][:k])]
        return np.asarray(ok, np.int64)

    def longest_match(self, notes: Notes) -> int:
        """Length in notes of the longest run of the sample found in one training piece (any
        single note matches: 1; empty: 0)."""
        s = symbols(notes)
        lo, hi = 0, min(len(s), self.longest_piece)  # lo symbols match, hi + 1 may not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self._matches(s, mid)):
                lo = mid
            else:
                hi = mid - 1
        return lo + 1 if len(notes) else 0

    def copied_share(self, notes: Notes, min_len: int = 8) -> float:
        """Share of the sample's notes inside some run of >= `min_len` notes found in training."""
        if len(notes) < max(min_len, 2):
            return 0.0
        k = max(min_len - 1, 1)
        starts = self._matches(symbols(notes), k)
        covered = np.zeros(len(notes) + 1, np.int64)
        np.add.at(covered, starts, 1)
        np.add.at(covered, starts + k + 1, -1)  # a window of k symbols spans k + 1 notes
        return float((np.cumsum(covered[:-1]) > 0).mean())


def copy_report(sample_notes: Notes, index: TrainIndex, threshold: int = 24) -> dict:
    """{longest, share, flagged}: flagged when a run of >= `threshold` notes is found in
    training. Pass only the continuation, never the prompt."""
    longest = index.longest_match(sample_notes)
    return {"longest": longest, "share": index.copied_share(sample_notes),
            "flagged": longest >= threshold}
