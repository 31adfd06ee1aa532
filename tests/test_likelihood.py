"""Held-out likelihood on one scale: the scoring windows predict every token once, with the
stated context, and add up to the plain full-sequence figure where the piece fits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import scale_notes, write_midi

from mehldau.constants import IGNORE_INDEX
from mehldau.data.corpus import read_score
from mehldau.data.dataset import WindowDataset
from mehldau.data.packing import EventWindowDataset
from mehldau.evaluation.likelihood import PieceScore, dataset_nats, piece_size, summarize
from mehldau.nn.music_transformer import MusicTransformer, MusicTransformerConfig
from mehldau.tokenize import build_tokenizer


def tiny(context: int) -> MusicTransformer:
    torch.manual_seed(0)
    cfg = MusicTransformerConfig(vocab_size=30, n_layers=1, d_model=16, n_heads=2, d_ff=32,
                                 max_seq_len=context, max_relative_position=context,
                                 dropout=0.0)
    return MusicTransformer(cfg).eval()


def full_nats(model: MusicTransformer, seq: np.ndarray) -> float:
    ids = torch.as_tensor(seq)[None]
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits[0]
    return float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))


@pytest.mark.parametrize("prefix", [None, np.array([1])])
def test_strided_windows_score_every_token_once_with_half_a_context(prefix) -> None:
    seq = np.arange(3, 104)  # token value - 3 = its position in the piece
    ds = WindowDataset([seq], 16, 0, None if prefix is None else [prefix], stride=8)
    room = 16 - (0 if prefix is None else 1)
    seen: list[int] = []
    for item in ds:
        x, y = item["input_ids"].numpy(), item["labels"].numpy()
        for t in np.flatnonzero(y != IGNORE_INDEX):
            history = int((x[: t + 1] >= 3).sum())  # piece tokens the target is predicted from
            pos = int(y[t]) - 3
            assert history == min(pos, history) and history >= min(pos, room - 8)
            seen.append(int(y[t]))
    assert seen == seq[1:].tolist()  # each once, in order


def test_strided_scoring_equals_one_pass_where_the_piece_fits() -> None:
    model = tiny(64)
    seq = np.random.default_rng(1).integers(3, 29, 60)
    nats, n = dataset_nats(model, WindowDataset([seq], 64, 0, stride=32), "cpu", batch_size=3)
    assert n == 59
    assert nats == pytest.approx(full_nats(model, seq), rel=1e-5)
    # longer than the context: each window adds what it scores, whatever the batching
    long = np.random.default_rng(2).integers(3, 29, 300)
    a = dataset_nats(model, WindowDataset([long], 64, 0, stride=32), "cpu", batch_size=1)
    b = dataset_nats(model, WindowDataset([long], 64, 0, stride=32), "cpu", batch_size=7)
    assert a[1] == b[1] == 299 and a[0] == pytest.approx(b[0], rel=1e-5)


def test_event_windows_with_stride_score_every_event_once() -> None:
    from mehldau.branches.moonbeam_lora.recipe import _unframed as _frame

    tok = build_tokenizer("moonbeam")
    rows = tok.encode(_score(scale_notes(70, seed=3)))
    seq = _frame(rows, tok)
    plain = EventWindowDataset([seq], 32, tok)
    strided = EventWindowDataset([seq], 32, tok, stride=15)

    def targets(ds) -> int:
        return sum(int((it["labels"] != IGNORE_INDEX).any(-1).sum()) for it in ds)

    assert targets(strided) == targets(plain) == len(rows) - 1  # every row but the SOS
    with pytest.raises(ValueError, match="stride"):
        EventWindowDataset([seq], 32, tok, stride=31)


def _score(notes):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "x.mid"
    write_midi(path, notes)
    return read_score(path)


def test_every_tokenization_of_a_file_divides_by_the_files_notes_and_seconds(tmp_path
                                                                             ) -> None:
    # a unison pair (48 twice at 0 s): the tokenizers read it differently, the file does not
    notes = scale_notes(40, seed=5) + [(48, 0.0, 3.0, 70), (52, 0.0, 3.0, 70)]
    write_midi(tmp_path / "x.mid", notes, pedals=[(0.5, 4.0)])
    score = read_score(tmp_path / "x.mid")
    readings = {n: build_tokenizer(n) for n in ("performance", "duration", "moonbeam")}
    decoded = {n: t.decode(t.encode(score)).note_num() for n, t in readings.items()}
    assert len(set(decoded.values())) > 1  # why the file, not the tokenizer, is the unit
    n, seconds = piece_size(score)
    assert n == len(notes)
    assert seconds == pytest.approx(max(s + d for _, s, d, _ in notes), abs=0.01)


def test_summary_units() -> None:
    s = summarize([PieceScore("a", 100.0, 50, 20, 10.0), PieceScore("b", 50.0, 25, 10, 5.0)])
    assert s["nats_per_note"] == pytest.approx(5.0)
    assert s["bits_per_second"] == pytest.approx(150 / math.log(2) / 15)
    assert s["nats_per_token"] == pytest.approx(2.0) and s["notes"] == 30


class NGram(torch.nn.Module):
    """A count model of order 3 (the two tokens before a target), fitted on long samples of
    the test's process: calibrated, so its code length is the process's entropy, whatever the
    tokenization. Scores like the real models: `model(input_ids, labels).loss`."""

    def __init__(self, sequences: list[np.ndarray], vocab: int, alpha: float = 1e-4) -> None:
        super().__init__()
        counts: dict[tuple[int, int], np.ndarray] = {}
        for s in sequences:
            for t in range(2, len(s)):
                counts.setdefault((int(s[t - 2]), int(s[t - 1])), np.zeros(vocab))[s[t]] += 1
        self.logp = {k: np.log((v + alpha) / (v.sum() + alpha * vocab)) for k, v in counts.items()}
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        from types import SimpleNamespace

        total, n = 0.0, 0
        for x, y in zip(input_ids.tolist(), labels.tolist()):
            for t, target in enumerate(y):
                if target == IGNORE_INDEX:
                    continue
                table = self.logp.get((x[t - 1], x[t])) if t >= 1 else None
                total -= table[target] if table is not None else -math.log(self.vocab)
                n += 1
        return SimpleNamespace(loss=torch.tensor(total / max(n, 1)))


@pytest.mark.parametrize("name", ["performance", "duration"])
def test_nats_per_note_is_the_same_for_two_tokenizations_of_the_same_notes(name, tmp_path
                                                                          ) -> None:
    """Notes every 0.25 s, each pitch uniform over 12, all else fixed: log 12 nats per note.
    A calibrated model of either tokenization, scored by the policy, must find it (within
    2 %: the piece's first tokens and its EOS), though their tokens differ in kind."""
    from mehldau.data.dataset import add_bos_eos
    from mehldau.evaluation.likelihood import score_pieces

    rng = np.random.default_rng(0)
    tok = build_tokenizer(name)

    def piece(k: int, n: int):
        notes = [(int(60 + rng.integers(12)), 0.25 * i, 0.2, 64) for i in range(n)]
        score = read_score(write_midi(tmp_path / f"{k}.mid", notes))
        return add_bos_eos(tok.encode(score), tok), score

    train = [piece(k, 400)[0] for k in range(40)]
    model = NGram(train, tok.vocab_size)
    seq, score = piece(99, 600)
    scores = score_pieces(
        model, lambda s: WindowDataset([s], 64, tok.special_tokens["pad"], stride=32),
        [("x", seq, *piece_size(score))], "cpu")
    s = summarize(scores)
    assert s["notes"] == 600
    assert s["nats_per_note"] == pytest.approx(math.log(12), rel=0.02)
    assert s["bits_per_second"] == pytest.approx(math.log2(12) * 4, rel=0.03)  # 4 notes/s
