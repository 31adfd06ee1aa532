"""Moonbeam's numerics (docs/moonbeam.md §3.7): one released-layout checkpoint scored on a
folder of MIDI in fp32, and in bf16 (`model.to(bfloat16)`, as the reference runs it) with
`model.reference_numerics` off (fp32 angles) and on (the reference's bf16 angles).

    python benchmarks/moonbeam_numerics.py --midi ~/jazz --weights ~/moonbeam_309M.pt
    python benchmarks/moonbeam_numerics.py --midi ~/jazz        # random 309M weights

Prints, per setting, the loss in nats per event (the branch's val windows: consecutive
windows of `--context` rows, onsets re-based to each window, the pedal ignored as when
adapting released weights) and the relative distance of its teacher-forced logits to the
fp32 ones (||bf16 - fp32|| / ||fp32||). Without `--weights` the weights are random, in the
released layout, saved as the released files are and read by `load_released`: the figures
then show how far each bf16 setting moves a model from fp32, not which numerics trained
weights prefer. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from mehldau.data.corpus import BadMidi, read_score
from mehldau.data.packing import EventWindowDataset
from mehldau.nn.moonbeam import MoonbeamConfig, MoonbeamForCausalLM, load_released
from mehldau.tokenize.base import build_tokenizer

SETTINGS = (("fp32", torch.float32, False), ("bf16, reference_numerics=false", torch.bfloat16,
                                              False),
            ("bf16, reference_numerics=true", torch.bfloat16, True))


def windows(midi: Path, config: MoonbeamConfig, context: int, limit: int) -> list[dict]:
    tokenizer = build_tokenizer("moonbeam", {"onset_vocab_size": config.onset_vocab_size,
                                             "dur_vocab_size": config.dur_vocab_size,
                                             "fold_pedal": False})
    seqs = []
    for path in sorted(p for p in midi.rglob("*") if p.suffix.lower() in (".mid", ".midi")):
        try:
            seqs.append(tokenizer.encode(read_score(path)))
        except BadMidi:
            continue
    data = EventWindowDataset(seqs, context, tokenizer)
    return [data[i] for i in range(min(limit, len(data)))]


def score(model: MoonbeamForCausalLM, items: list[dict]) -> tuple[float, int, torch.Tensor]:
    """(nats per event, events, the teacher-forced logits of every window in fp32)."""
    total, events, logits = 0.0, 0, []
    with torch.no_grad():
        for item in items:
            batch = {k: v[None] for k, v in item.items()}
            out = model(**batch)
            n = int((batch["labels"][:, 1:, 1] != -100).sum())
            total += float(out.loss) * n
            events += n
            logits.append(out.logits.float())
    return total / events, events, torch.cat(logits, dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--midi", type=Path, required=True, help="a folder of MIDI files")
    ap.add_argument("--weights", type=Path, help="a released .pt (default: random weights)")
    ap.add_argument("--size", default="309M", choices=["309M", "839M"])
    ap.add_argument("--context", type=int, default=512, help="rows per window")
    ap.add_argument("--windows", type=int, default=4, help="windows scored (the first N)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = MoonbeamConfig.released(args.size)
    items = windows(args.midi, config, args.context, args.windows)
    weights = args.weights
    with tempfile.TemporaryDirectory() as tmp:
        if weights is None:  # random weights, written as the released files are
            torch.manual_seed(0)
            sd = MoonbeamForCausalLM(config).state_dict()
            weights = Path(tmp) / f"random_{args.size}.pt"
            torch.save({"model_state_dict": {f"module.{k}": v.to(torch.bfloat16)
                                             for k, v in sd.items()}}, weights)
            del sd
        results, fp32 = [], None
        for name, dtype, reference in SETTINGS:
            model = load_released(weights, replace(config, reference_numerics=reference),
                                  dtype=dtype)
            t0 = time.perf_counter()
            loss, events, logits = score(model, items)
            fp32 = logits if fp32 is None else fp32
            results.append({"setting": name, "nats_per_event": round(loss, 4),
                            "events": events, "logits_vs_fp32": round(
                                float((logits - fp32).norm() / fp32.norm()), 5),
                            "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(results[-1]), flush=True)
            del model
    print(json.dumps({"weights": str(args.weights or f"random {args.size}"),
                      "context": args.context, "windows": len(items)}))


if __name__ == "__main__":
    main()
