"""Sampling speed of every branch, measured in one run (a benchmark: it prints figures and
ratios, it asserts nothing).

Token branches (production's Music Transformer, perceiver_mt's Perceiver AR), base presets
with random weights: new tokens per second at batch 1 and batch B for
- the default sampler (`StaticKV` buffers written in place, one-token steps by `FusedStep`;
  on CUDA that step recorded once as a CUDA graph, `GraphedStep`, and also timed without it),
- the plain path (cache grown by concatenation, steps through the modules),
- the step's matrix products alone, with their GELU and residual adds (the weights read once
  per token, nothing else): the ceiling for this model at this batch on this machine,
- `transformers` `GPT2LMHeadModel.generate` with the same depth, width, heads, feed-forward
  and vocabulary, sampling as many tokens with its own KV cache (`do_sample`, `top_k=0`, no
  stop token), the anchor a reader knows;
and the ratios. The real-time factor (seconds of music per second of compute) multiplies
tokens/s by the seconds of music per token of the embedded demo corpus under the duration
tokenizer (random weights play no meaningful time). Time to first note: from the call to the
first complete note out of `mehldau.generation.stream_notes`, at batch 1, with no prompt and
with a 5 s prompt from the demo corpus, through the grammar mask `mehldau-generate` uses.
moonbeam_lora and scg_diffusion come from `sampling_moonbeam.py` and `sampling_scg.py`.

Every figure is the best of `--repeats` runs: on a shared machine the fastest run is the one
least disturbed. A branch's paths and batch sizes take turns within each round, so each gets
the same chance and the same slow spells.

    python benchmarks/sampling.py                      # CPU, fp32, 1,024 tokens
    python benchmarks/sampling.py --only production --profile
    python benchmarks/sampling.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mehldau.generation import stream_notes
from mehldau.nn.music_transformer import MusicTransformer, MusicTransformerConfig
from mehldau.nn.perceiver_ar import PerceiverAR, PerceiverARConfig
from mehldau.sampling import (
    KVCacheDecoder,
    PerceiverDecoder,
    SamplingConfig,
    sample_tokens,
    stream_tokens,
)
from mehldau.tokenize.duration import DurationTokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENIZER = DurationTokenizer()  # the production and perceiver_mt default (453 ids)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


Runner = tuple[Callable[[], object], int]  # a call, and the units (tokens) it produces


def best_rates(runners: dict[str, Runner], device: str, repeats: int) -> dict[str, float]:
    """Units per second of each runner: the fastest of `repeats` calls after one warm-up.
    The runners take turns, round after round, so that a slow spell of a shared machine
    (memory bandwidth here moves by 20 % over tens of seconds) falls on all of them and the
    ratios between them hold."""
    for run, _ in runners.values():
        run()
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(repeats):
        for key, (run, _) in runners.items():
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            best[key] = min(best[key], time.perf_counter() - t0)
    return {key: units / best[key] for key, (_, units) in runners.items()}


def base_model(branch: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    if branch == "production":  # configs/model/base.yaml
        model = MusicTransformer(MusicTransformerConfig(
            vocab_size=TOKENIZER.vocab_size, n_layers=6, d_model=512, n_heads=8, d_ff=2048,
            max_seq_len=2048, max_relative_position=1024, dropout=0.0))
    else:  # configs/model/perceiver_base.yaml
        model = PerceiverAR(PerceiverARConfig(
            vocab_size=TOKENIZER.vocab_size, n_layers=8, d_model=512, n_heads=8, d_ff=2048,
            max_seq_len=8192, num_latents=1024, max_relative_position=1024, dropout=0.0,
            prefix_dropout=0.0))
    return model.to(device=device, dtype=dtype).eval()


def decoder(model: torch.nn.Module, fast: bool, graph: bool | None = None):
    """The default sampler (`fast`; on CUDA its step a recorded graph unless `graph=False`) or
    the plain path."""
    if isinstance(model, PerceiverAR):
        return PerceiverDecoder(model, static=fast, fused=fast, graph=graph)
    return KVCacheDecoder(model, model.config.max_seq_len, static=fast, fused=fast, graph=graph)


def ours(model: torch.nn.Module, batch: int, n: int, device: str, fast: bool,
         graph: bool | None = None) -> Runner:
    """Sampling `n` new tokens per row (all rows counted)."""
    prompt = torch.ones(batch, 1, dtype=torch.long, device=device)

    def run() -> None:
        gen = torch.Generator(device=device).manual_seed(0)
        out = sample_tokens(decoder(model, fast, graph), prompt, n, SamplingConfig(), gen)
        assert out.shape == (batch, n + 1)

    return run, batch * n


def hf(model: torch.nn.Module, batch: int, n: int, device: str, dtype: torch.dtype) -> Runner:
    """The same for GPT-2 of the same shape through `generate` (absolute positions; it does
    no relative-attention work)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    c = model.config
    torch.manual_seed(0)
    g = GPT2Config(vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model,
                   n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.d_ff,
                   bos_token_id=1, eos_token_id=None, pad_token_id=0)
    gpt = GPT2LMHeadModel(g).to(device=device, dtype=dtype).eval()
    prompt = torch.ones(batch, 1, dtype=torch.long, device=device)

    def run() -> None:
        with torch.no_grad():
            out = gpt.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                               top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n,
                               use_cache=True, pad_token_id=0)
        assert out.shape == (batch, n + 1)

    return run, batch * n


def weights_floor(model: torch.nn.Module, batch: int, n: int, device: str) -> Runner:
    """The step's matrix products alone (the sampler's own copy of the weights, in the kernel
    it chose; no attention, no sampling): what reading the weights costs, a ceiling no sampler
    of this model passes."""
    from mehldau.nn.fused_step import FusedStep

    step = FusedStep.for_model(model, batch)

    def run() -> None:
        for _ in range(n):
            step.products()

    return run, batch * n


def kernel_choice(model: torch.nn.Module, batch: int) -> str:
    """Which kernel the step chose at this batch size for each kind of product, and each
    kernel's products in ms."""
    from mehldau.nn.fused_step import FusedStep

    step = FusedStep.for_model(model, batch)
    timed = ", ".join(f"{k} {t * 1e3:.2f}" for k, t in step.seconds.items())
    return f"{step.kernel} ({timed} ms)" if timed else step.kernel


def demo_ids() -> list[np.ndarray]:
    """The embedded demo corpus under the duration tokenizer, one array per piece."""
    from mehldau.data.demo import write_demo_corpus

    with tempfile.TemporaryDirectory() as d:
        return [TOKENIZER.encode_file(p) for p in write_demo_corpus(Path(d))]


def first_note_seconds(model: torch.nn.Module, prompt: np.ndarray, device: str, repeats: int
                       ) -> float:
    """Seconds from the call to the first note out of the stream, at batch 1 (best of)."""
    ids = torch.as_tensor(prompt, device=device)[None]
    mask = torch.as_tensor(TOKENIZER.next_token_mask(), device=device)
    sp = TOKENIZER.special_tokens
    best = float("inf")
    for r in range(repeats + 1):  # the first is a warm-up
        sync(device)
        t0 = time.perf_counter()
        tokens = stream_tokens(decoder(model, True), ids, 2000, SamplingConfig(),
                               torch.Generator(device=device).manual_seed(r),
                               banned_ids=(sp["pad"], sp["bos"], sp["eos"]), allowed_next=mask)
        next(stream_notes(tokens, TOKENIZER, ids.cpu().numpy()))
        if r:
            best = min(best, time.perf_counter() - t0)
    return best


def token_branch(branch: str, a: argparse.Namespace, per_token: float, prompt: np.ndarray
                 ) -> dict:
    dtype = DTYPES[a.dtype]
    model = base_model(branch, a.device, dtype)
    c = model.config
    print(f"\n{branch}: {c.n_layers} x {c.d_model}, {c.n_heads} heads, d_ff {c.d_ff}, "
          f"vocab {c.vocab_size}, context {c.max_seq_len}")
    row: dict = {"branch": branch}
    sizes = ((1, a.tokens), (a.batch, a.tokens // 2))
    runners: dict[str, Runner] = {}
    graphs = a.device.startswith("cuda")  # the default there; the eager fused step beside it
    for batch, n in sizes:
        if graphs:
            runners[f"eager{batch}"] = ours(model, batch, n, a.device, True, graph=False)
        runners |= {f"fast{batch}": ours(model, batch, n, a.device, True),
                    f"plain{batch}": ours(model, batch, n, a.device, False),
                    f"hf{batch}": hf(model, batch, n, a.device, dtype),
                    f"floor{batch}": weights_floor(model, batch, n, a.device)}
    rate = best_rates(runners, a.device, a.repeats)
    for batch, n in sizes:
        fast, plain, anchor, floor = (rate[f"{k}{batch}"] for k in ("fast", "plain", "hf",
                                                                     "floor"))
        row[batch] = (fast, plain, anchor)
        print(f"  batch {batch:2d}, {n} tokens: {fast:7.1f} tok/s (plain path {plain:7.1f}, "
              f"fast/plain {fast / plain:.2f}x), HF GPT-2 generate {anchor:7.1f} tok/s, "
              f"ours/HF {fast / anchor:.2f}x; the weights' matrix products alone "
              f"{floor:7.1f} tok/s (ours at {fast / floor:.0%} of it)")
        if graphs:
            eager = rate[f"eager{batch}"]
            print(f"  batch {batch:2d}: the step as a CUDA graph {fast:7.1f} tok/s, the same "
                  f"step launched kernel by kernel {eager:7.1f} tok/s: {fast / eager:.2f}x")
    for batch, _ in sizes:
        print(f"  batch {batch:2d}: the step's products chose {kernel_choice(model, batch)}")
    (f1, _, h1), (fb, _, hb) = row[1], row[a.batch]
    print(f"  batch {a.batch} / batch 1 throughput: ours {fb / f1:.2f}x, HF {hb / h1:.2f}x")
    row["rtf"] = f1 * per_token
    print(f"  real-time factor at batch 1: {row['rtf']:.2f} s of music per s "
          f"({per_token * 1000:.1f} ms of music per token)")
    row["ttfn"] = first_note_seconds(model, np.array([1]), a.device, a.repeats)
    row["ttfn_prompt"] = first_note_seconds(model, prompt, a.device, a.repeats)
    print(f"  time to first note, batch 1: {row['ttfn']:.3f} s without a prompt, "
          f"{row['ttfn_prompt']:.3f} s after a {len(prompt)}-token (5 s) prompt")
    return row


def profile(branch: str, device: str, dtype: torch.dtype, n: int = 256, rows: int = 15
            ) -> None:
    """Where the time of sampling `n` tokens at batch 1 goes, by operator (self time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = base_model(branch, device, dtype)
    prompt = torch.ones(1, 1, dtype=torch.long, device=device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        sample_tokens(decoder(model, True), prompt, n, SamplingConfig(),
                      torch.Generator(device=device).manual_seed(0))
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"\nprofile: {branch}, batch 1, {n} tokens")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def other_branch(name: str, a: argparse.Namespace) -> list[dict]:
    """moonbeam_lora / scg_diffusion: their own modules' `measure`, its rows printed."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        module = importlib.import_module(f"sampling_{name}")
    except ImportError as e:
        print(f"\n{name}: skipped ({e})")
        return []
    print(f"\n{name}:")
    rows = module.measure(a.device, DTYPES[a.dtype])
    if hasattr(module, "print_rows"):  # scg's measure prints its own table
        module.print_rows(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["production", "perceiver_mt", "moonbeam", "scg"],
                    action="append")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    which = a.only or ["production", "perceiver_mt", "moonbeam", "scg"]
    pieces = demo_ids()
    per_token = sum(TOKENIZER.seconds_of(p) for p in pieces) / sum(len(p) for p in pieces)
    first = pieces[0]
    cut = int(np.searchsorted(np.cumsum(TOKENIZER.seconds_per_id()[first]), 5.0))
    print(f"device {a.device}, {a.dtype}, torch threads {torch.get_num_threads()}, "
          f"best of {a.repeats}")
    rows = [token_branch(b, a, per_token, first[:cut]) for b in ("production", "perceiver_mt")
            if b in which]
    for name in ("moonbeam", "scg"):
        if name in which:
            other_branch(name, a)
    if rows:
        print("\n| branch | batch 1 tok/s (ours / HF) | batch 8 tok/s (ours / HF) | "
              "batch 8 / batch 1 | real-time factor | first note (no prompt / 5 s prompt) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            (f1, _, h1), (fb, _, hb) = r[1], r[a.batch]
            print(f"| {r['branch']} | {f1:.0f} / {h1:.0f} = {f1 / h1:.2f}x | {fb:.0f} / {hb:.0f}"
                  f" = {fb / hb:.2f}x | {fb / f1:.2f}x | {r['rtf']:.2f} | "
                  f"{r['ttfn']:.3f} / {r['ttfn_prompt']:.3f} s |")
    if a.profile:
        for b in ("production", "perceiver_mt"):
            if b in which:
                profile(b, a.device, DTYPES[a.dtype])


if __name__ == "__main__":
    main()
