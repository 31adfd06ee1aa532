"""Sampling speed of the token branches against Hugging Face `generate` at the same size, all
measured in one run (a benchmark: it prints figures and ratios, it asserts nothing).

For the production Music Transformer (and, with --perceiver, the Perceiver AR decoder), new
tokens per second at batch 1 and batch B with the KV cache, against `GPT2LMHeadModel.generate`
with the same depth, width, heads, feed-forward and vocabulary sampling the same number of
tokens with its own cache (`do_sample=True`, `top_k=0`, no stop token), and the ratios. With
--profile, where the time of one sampled token goes (torch.profiler, top operators).

    python benchmarks/sampling.py                      # CPU, fp32, 1,024 tokens
    python benchmarks/sampling.py --tokens 512 --batch 8 --profile
    python benchmarks/sampling.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import time

import torch

from mehldau.nn.music_transformer import MusicTransformer, MusicTransformerConfig
from mehldau.sampling import KVCacheDecoder, SamplingConfig, sample_tokens

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VOCAB = 453  # the duration tokenizer's vocabulary (the production default)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ours(cfg: MusicTransformerConfig, batch: int, n: int, device: str, dtype: torch.dtype,
         static: bool = True) -> float:
    """New tokens per second (all rows counted) of our sampler with its KV cache (static:
    written in place; False: grown by concatenation, the plain path)."""
    torch.manual_seed(0)
    model = MusicTransformer(cfg).to(device=device, dtype=dtype).eval()
    prompt = torch.ones(batch, 1, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def run(k: int) -> torch.Tensor:
        return sample_tokens(KVCacheDecoder(model, cfg.max_seq_len, True, static=static),
                             prompt, k, SamplingConfig(), generator=gen)

    run(8)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = run(n)
    sync(device)
    assert out.shape == (batch, n + 1)
    return batch * n / (time.perf_counter() - t0)


def hf(cfg: MusicTransformerConfig, batch: int, n: int, device: str, dtype: torch.dtype
       ) -> float:
    """The same for GPT-2 of the same shape through `generate` (absolute positions: the
    anchor a reader knows; it does no relative-attention work)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    g = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                   n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
                   bos_token_id=1, eos_token_id=None, pad_token_id=0)
    model = GPT2LMHeadModel(g).to(device=device, dtype=dtype).eval()
    prompt = torch.ones(batch, 1, dtype=torch.long, device=device)

    def run(k: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                  do_sample=True, top_k=0, top_p=1.0, max_new_tokens=k,
                                  min_new_tokens=k, use_cache=True, pad_token_id=0)

    run(8)
    sync(device)
    t0 = time.perf_counter()
    out = run(n)
    sync(device)
    assert out.shape == (batch, n + 1)
    return batch * n / (time.perf_counter() - t0)


def profile(cfg: MusicTransformerConfig, batch: int, n: int, device: str, dtype: torch.dtype,
            rows: int = 15) -> None:
    """Where the time of sampling `n` tokens goes, by operator (self time)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    model = MusicTransformer(cfg).to(device=device, dtype=dtype).eval()
    prompt = torch.ones(batch, 1, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        sample_tokens(KVCacheDecoder(model, cfg.max_seq_len, True), prompt, n,
                      SamplingConfig(), generator=gen)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    dtype = DTYPES[a.dtype]
    # the production base preset's shape (6 x 512, 8 heads, d_ff 2048), context 2,048
    cfg = MusicTransformerConfig(vocab_size=VOCAB, n_layers=6, d_model=512, n_heads=8,
                                 d_ff=2048, max_seq_len=2048, max_relative_position=1024,
                                 dropout=0.0)
    print(f"device {a.device}, {a.dtype}, torch threads {torch.get_num_threads()}; "
          f"{cfg.n_layers} x {cfg.d_model}, {cfg.n_heads} heads, d_ff {cfg.d_ff}, "
          f"vocab {cfg.vocab_size}")
    rows = []
    for batch, n in ((1, a.tokens), (a.batch, a.tokens // 2)):
        o, h = ours(cfg, batch, n, a.device, dtype), hf(cfg, batch, n, a.device, dtype)
        c = ours(cfg, batch, n, a.device, dtype, static=False)
        rows.append((batch, n, o, h))
        print(f"batch {batch:2d}, {n} tokens: production {o:7.1f} tok/s (concatenated cache "
              f"{c:7.1f}, static {o / c:.2f}x), HF GPT-2 generate {h:7.1f} tok/s, "
              f"ratio {o / h:.2f}x")
    (b1, _, o1, h1), (bb, _, ob, hb) = rows
    print(f"batch {bb} / batch 1 throughput: production {ob / o1:.2f}x, HF {hb / h1:.2f}x")
    if a.profile:
        print(f"\nprofile: production, batch 1, {min(a.tokens, 256)} tokens")
        profile(cfg, 1, min(a.tokens, 256), a.device, dtype)


if __name__ == "__main__":
    main()
