"""Likelihood of held-out music on one scale for every autoregressive branch.

A token's cross-entropy depends on the tokenization: a scheme that spends five tokens on a
note makes more, easier predictions than one that spends three, so nats per token do not
compare across branches. Summed over a piece, the nats are the model's code length for that
piece, and that compares once divided by what was coded: its notes (nats per note) or its
duration (bits per second of music, the unit of AMT's `eval-loss`).

Context policy, the same for every branch (`POLICY`): a piece, framed as in training (BOS
... EOS, a style token first if the model has styles), is scored in windows of the model's
full context, each ending at its last target and scoring only its last `stride` targets:
half the context for the Music Transformer and Moonbeam, the latent count for Perceiver AR
(the positions it predicts from one window). Every token is predicted exactly once, with at
least `context - stride` tokens before it (all of them near the piece's start). The context
is counted in each model's own tokens, so its length in seconds differs by tokenizer; the
compare report states both.

Notes and seconds are the file's own (`piece_size`: its notes with the pedal folded, its
end in seconds), not the tokenizer's reading of it, so every branch divides one file's nats
by the same two numbers (tokenizers disagree on details: the note-on/off and duration
schemes merge overlapping notes of one pitch, Moonbeam's keeps them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mehldau.train.trainer import count_targets

POLICY = ("every token predicted once from a window of the model's full context that ends "
          "at it, scoring the window's last half (Perceiver AR: its latent positions), so "
          "each token sees at least half a context before it")


def piece_size(score) -> tuple[int, float]:
    """(notes, seconds) of a symusic Score: what nats per note and bits per second divide by."""
    from mehldau.metrics import read_notes

    start, end = read_notes(score)
    return len(start), float(end.max(initial=0.0))


@dataclass
class PieceScore:
    id: str
    nats: float  # summed over every target of the piece
    targets: int  # tokens (compound: events) predicted
    notes: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def dataset_nats(model: torch.nn.Module, dataset: Dataset, device: torch.device | str,
                 batch_size: int = 8) -> tuple[float, int]:
    """(total nats, targets) of a dataset of labelled windows: the model's mean loss per
    batch times the batch's targets, so windows of any fill add up exactly."""
    model.eval()
    total, seen = 0.0, 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        n = count_targets(batch)
        if n:
            total += float(model(**batch).loss.float()) * n
            seen += n
    return total, seen


def score_pieces(model: torch.nn.Module, windows: Callable[[np.ndarray], Dataset],
                 pieces: Sequence[tuple[str, np.ndarray, int, float]],
                 device: torch.device | str, batch_size: int = 8) -> list[PieceScore]:
    """`pieces`: (id, framed sequence, notes, seconds); `windows(seq)`: the policy's dataset
    over one piece."""
    out = []
    for pid, seq, notes, seconds in pieces:
        nats, targets = dataset_nats(model, windows(seq), device, batch_size)
        out.append(PieceScore(pid, nats, targets, notes, seconds))
    return out


def summarize(scores: Sequence[PieceScore]) -> dict[str, float]:
    """Pooled over pieces: every note (second) of the test split weighs the same."""
    nats = sum(s.nats for s in scores)
    notes = sum(s.notes for s in scores)
    seconds = sum(s.seconds for s in scores)
    targets = sum(s.targets for s in scores)
    return {"nats_per_note": nats / notes if notes else math.nan,
            "bits_per_second": nats / math.log(2) / seconds if seconds else math.nan,
            "nats_per_token": nats / targets if targets else math.nan,
            "pieces": len(scores), "notes": notes, "seconds": round(seconds, 3),
            "tokens": targets}
