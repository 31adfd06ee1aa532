"""Moonbeam's event sampler: events per second and real-time factor at batch 1 and batch 8,
the static KV cache (buffers written in place) against the plain one (grown by
concatenation), and the time to the first note, all measured in one run (a benchmark: it
prints figures and ratios; it asserts nothing but that both caches sampled something).

Shapes (random weights; speed does not depend on them):
- `default`: the moonbeam_lora branch's default preset (`configs/model/moonbeam_tiny.yaml`:
  6 x 32 = 192 wide, 4 layers, GRU head 2 x 128, the released 2,341-id vocabulary, a window
  of 256 events). What the branch trains and samples out of the box, and small enough for a
  CPU benchmark; 512 events go twice past its window, so both caches rebuild.
- `309m`: the smaller released architecture (1,536 wide, 9 layers, GRU 2 x 1,024) at its
  fine-tuning window of 2,048 events: for a GPU, where the cache's cost shows at length.

Real-time factor = seconds of music per second of compute, all samples of a batch counted.
Random weights play no music, so each event (one note) is given a fixed duration: jazz piano
at 7.28 notes a second, the note density of the reference split in the README's comparison
of the branches (64 jazz-piano MIDI files); the factor is events/s / 7.28.

Time to first note: seconds from the call to the first complete event (one backbone pass over
a bare SOS, then the six GRU steps), batch 1, the median of 5 calls after a warm-up.

    python benchmarks/sampling_moonbeam.py                       # CPU, fp32, 512 events
    python benchmarks/sampling_moonbeam.py --threads 1 --profile
    python benchmarks/sampling_moonbeam.py --device cuda --dtype bf16 --preset 309m
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from mehldau.branches.moonbeam_lora.recipe import model_config
from mehldau.nn.moonbeam import MoonbeamConfig, MoonbeamForCausalLM
from mehldau.sampling import SamplingConfig
from mehldau.sampling_compound import EventSampling, sample_events
from mehldau.tokenize.base import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NOTES_PER_SECOND = 7.28  # jazz piano, one event = one note (module docstring)
PRESETS = {"default": "moonbeam_tiny", "309m": "moonbeam_309m"}


def preset_config(preset: str) -> MoonbeamConfig:
    """The model config of a preset name in PRESETS, context included (as `max_len`)."""
    model = OmegaConf.load(ROOT / f"configs/model/{PRESETS[preset]}.yaml")
    return model_config(OmegaConf.create({"model": model}))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _Bench:
    """A random-weight model of one preset and what sampling it needs."""

    def __init__(self, preset: str, device: str, dtype: torch.dtype) -> None:
        self.cfg = preset_config(preset)
        torch.manual_seed(0)
        with torch.device(device):
            self.model = MoonbeamForCausalLM(self.cfg).to(dtype).eval()
        self.tok = build_tokenizer("moonbeam", {"onset_vocab_size": self.cfg.onset_vocab_size,
                                                "dur_vocab_size": self.cfg.dur_vocab_size})
        self.device = device
        self.opts = EventSampling(SamplingConfig(temperature=1.0, top_p=0.95))

    def sample(self, batch: int, events: int, static: bool) -> list[np.ndarray]:
        prompt = torch.full((batch, 1, 6), -1, device=self.device)  # a bare SOS
        return sample_events(self.model, self.tok, prompt, events, self.opts, self.cfg.max_len,
                             generator=torch.Generator(device=self.device).manual_seed(0),
                             static=static)

    def timed(self, batch: int, events: int, static: bool) -> tuple[float, list[np.ndarray]]:
        _sync(self.device)
        t0 = time.perf_counter()
        rows = self.sample(batch, events, static)
        _sync(self.device)
        return time.perf_counter() - t0, rows


def measure(device: str = "cpu", dtype: torch.dtype = torch.float32, events: int = 512,
            preset: str = "default", batches: tuple[int, ...] = (1, 8), repeats: int = 2
            ) -> list[dict]:
    """One row per batch size and cache (static, then plain): events/s (all samples counted),
    the real-time factor, whether the static cache sampled the plain one's events, and at
    batch 1 the time to the first note. The two caches take turns, `repeats` runs each, and
    each keeps its fastest: on a shared machine the load changes within a run."""
    bench = _Bench(preset, device, dtype)
    out = []
    for batch in batches:
        got, best = {}, {}
        for static in (True, False):
            bench.sample(batch, 8, static)  # warm-up
        for _ in range(repeats):
            for static in (True, False):
                seconds, got[static] = bench.timed(batch, events, static)
                best[static] = min(seconds, best.get(static, seconds))
        for static in (True, False):
            assert all(len(r) == events + 1 for r in got[static])
            seconds = best[static]
            rate = batch * events / seconds
            row = {"branch": "moonbeam_lora", "preset": preset, "device": device,
                   "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                   "cache": "static" if static else "plain", "events": events,
                   "context": bench.cfg.max_len, "seconds": seconds, "events_per_s": rate,
                   "realtime_factor": rate / NOTES_PER_SECOND}
            if batch == 1:
                row["first_note_s"] = time_to_first_note(bench, static)
            out.append(row)
        same = all(np.array_equal(a, b) for a, b in zip(got[True], got[False]))
        for row in out[-2:]:
            row["same_as_plain"] = same
    return out


def time_to_first_note(bench: _Bench, static: bool = True, repeats: int = 5) -> float:
    """Median seconds from the call to one complete event, batch 1, bare SOS."""
    bench.sample(1, 1, static)
    return statistics.median(bench.timed(1, 1, static)[0] for _ in range(repeats))


def profile(preset: str, batch: int, events: int, device: str, dtype: torch.dtype,
            static: bool = True, rows: int = 20) -> str:
    """Where the time of sampling `events` events goes, by operator (self time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    bench = _Bench(preset, device, dtype)
    bench.sample(batch, 8, static)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda")
                                     else [])
    with torch_profile(activities=acts) as prof:
        bench.sample(batch, events, static)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--events", type=int, default=512)
    ap.add_argument("--preset", choices=list(PRESETS), default="default")
    ap.add_argument("--repeats", type=int, default=2, help="runs per cache, fastest kept")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    ap.add_argument("--profile", action="store_true", help="also profile batch 1, both caches")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = preset_config(a.preset)
    print(f"moonbeam_lora {a.preset}: {cfg.num_hidden_layers} x {cfg.hidden_size}, GRU "
          f"{cfg.decoder_num_hidden_layers} x {cfg.decoder_hidden_size}, vocab "
          f"{cfg.decode_vocab_size}, window {cfg.max_len}; {a.device}, {a.dtype}, torch threads "
          f"{torch.get_num_threads()}; {a.events} events; music at {NOTES_PER_SECOND} notes/s")
    print_rows(measure(a.device, DTYPES[a.dtype], a.events, a.preset, repeats=a.repeats))
    if a.profile:
        n = min(a.events, 300)
        for static in (False, True):
            print(f"\nprofile: batch 1, {n} events, {'static' if static else 'plain'} cache")
            print(profile(a.preset, 1, n, a.device, DTYPES[a.dtype], static))


def print_rows(rows: list[dict]) -> None:
    """`measure`'s rows as lines, with static / plain and batch 8 / batch 1 ratios."""
    for r in rows:
        first = f", first note {r['first_note_s'] * 1e3:6.1f} ms" if "first_note_s" in r else ""
        print(f"batch {r['batch']:2d} {r['cache']:6s}: {r['events_per_s']:8.1f} events/s, "
              f"real-time x{r['realtime_factor']:6.2f}{first}")
    by = {(r["batch"], r["cache"]): r for r in rows}
    for b in sorted({r["batch"] for r in rows}):
        s, p = by[b, "static"], by[b, "plain"]
        print(f"batch {b:2d}: static / plain {s['events_per_s'] / p['events_per_s']:.2f}x, "
              f"same events {s['same_as_plain']}")
    b1, b8 = by[1, "static"], by[max(by)[0], "static"]
    print(f"batch {b8['batch']} / batch 1 throughput (static): "
          f"{b8['events_per_s'] / b1['events_per_s']:.2f}x")


if __name__ == "__main__":
    main()
