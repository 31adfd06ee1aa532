"""Production-branch benchmarks, all measured in one run (not tests: they print figures).

1. Training tokens/s of the same Music Transformer with the relative term (skew, and the
   fused FlexAttention path on CUDA) vs. plain causal SDPA (no relative term), and the ratio.
2. Peak memory of the relative term alone: skewing (O(L·D) beyond the L×L logits) vs. the
   naive Shaw gather (an L×L×Dh tensor per head), at L = 1024 and 2048, 8 heads of 64.
   On CPU each case runs in a fresh subprocess and reports its peak-RSS increase over the
   inputs (Linux); on CUDA, `max_memory_allocated` above the inputs.
3. Sampling tokens/s for 1,024 new tokens with and without the KV cache, and the ratio.

    python benchmarks/production.py            # CPU, fp32
    python benchmarks/production.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from mehldau.nn.music_transformer import MusicTransformer, MusicTransformerConfig
from mehldau.nn.relative_attention import relative_logits_naive, relative_logits_skew
from mehldau.sampling import KVCacheDecoder, SamplingConfig, sample_tokens

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_tokens_per_s(cfg: MusicTransformerConfig, batch: int, steps: int, device: str,
                       dtype: torch.dtype) -> float:
    torch.manual_seed(0)
    model = MusicTransformer(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, cfg.vocab_size, (batch, cfg.max_seq_len + 1), device=device)
    x, y = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up (and compile, for flex on CUDA)
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * cfg.max_seq_len * steps / (time.perf_counter() - t0)


def relative_term_memory(kind: str, L: int, H: int, Dh: int, device: str) -> float:
    """Peak extra bytes while computing the relative logits for one (B=1) layer."""
    if device == "cuda":
        q = torch.randn(1, H, L, Dh, device=device)
        emb = torch.randn(H, L, Dh, device=device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn = relative_logits_naive if kind == "naive" else relative_logits_skew
        out = fn(q, emb)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return float(peak)
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM), so the peak measured is
    # this computation's, not the interpreter's start-up.
    code = (
        "import json, torch\n"
        "from mehldau.nn.relative_attention import relative_logits_naive, relative_logits_skew\n"
        "def kb(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key): return int(line.split()[1])\n"
        "torch.set_num_threads(1)\n"
        f"q = torch.randn(1, {H}, {L}, {Dh}); emb = torch.randn({H}, {L}, {Dh})\n"
        f"fn = relative_logits_naive if {kind!r} == 'naive' else relative_logits_skew\n"
        "fn(q[:, :, :8], emb[:, :8])  # load kernels before the baseline\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kb('VmRSS:')\n"
        "out = fn(q, emb)\n"
        "print(json.dumps((kb('VmHWM:') - before) * 1024))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return float(res.stdout.strip().splitlines()[-1])


def sampling_tokens_per_s(cfg: MusicTransformerConfig, n: int, use_cache: bool, device: str,
                          dtype: torch.dtype) -> float:
    torch.manual_seed(0)
    model = MusicTransformer(cfg).to(device=device, dtype=dtype).eval()
    prompt = torch.ones(1, 1, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    sample_tokens(KVCacheDecoder(model, cfg.max_seq_len, use_cache), prompt, 8,
                  SamplingConfig(), generator=gen)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = sample_tokens(KVCacheDecoder(model, cfg.max_seq_len, use_cache), prompt, n,
                        SamplingConfig(), generator=gen)
    sync(device)
    assert out.shape[1] == n + 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=DTYPES)
    ap.add_argument("--train-seq-len", type=int, default=None,
                    help="context for the training benchmark (default: 512 on CPU, 2048 on CUDA)")
    ap.add_argument("--train-batch", type=int, default=None)
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--sample-tokens", type=int, default=1024)
    args = ap.parse_args()
    dev, dtype = args.device, DTYPES[args.dtype]
    cuda = dev == "cuda"
    L = args.train_seq_len or (2048 if cuda else 512)
    batch = args.train_batch or (8 if cuda else 2)
    steps = args.train_steps or (20 if cuda else 3)
    results: dict[str, object] = {"device": torch.cuda.get_device_name() if cuda else "cpu",
                                  "dtype": args.dtype, "threads": torch.get_num_threads()}

    # 1. training throughput: the base preset's width and depth at context L
    base = dict(vocab_size=311, n_layers=6, d_model=512, n_heads=8, d_ff=2048, max_seq_len=L,
                max_relative_position=max(L // 2, 1), dropout=0.1)
    impls = ["sdpa", "skew"] + (["flex"] if cuda else [])
    tps = {}
    for impl in impls:
        tps[impl] = train_tokens_per_s(MusicTransformerConfig(**base, attn_impl=impl), batch,
                                       steps, dev, dtype)
        print(f"train  L={L} batch={batch} {impl:5s}: {tps[impl]:10.0f} tokens/s", flush=True)
    for impl in impls[1:]:
        print(f"train  ratio {impl}/sdpa: {tps[impl] / tps['sdpa']:.2f}")
    results["train_tokens_per_s"] = tps

    # 2. memory of the relative term
    mem = {}
    for Lm in (1024, 2048):
        for kind in ("skew", "naive"):
            mem[f"{kind}_L{Lm}"] = relative_term_memory(kind, Lm, 8, 64, dev)
        theory_naive = Lm * Lm * 64 * 8 * 4
        print(f"memory L={Lm}: skew {mem[f'skew_L{Lm}'] / 2**20:8.1f} MiB, naive "
              f"{mem[f'naive_L{Lm}'] / 2**20:8.1f} MiB (ratio "
              f"{mem[f'naive_L{Lm}'] / max(mem[f'skew_L{Lm}'], 1):.1f}x; L*L*Dh*H*4 B = "
              f"{theory_naive / 2**20:.0f} MiB)", flush=True)
    results["relative_term_peak_bytes"] = mem

    # 3. sampling speed, base preset, window large enough that no refill happens
    n = args.sample_tokens
    scfg = MusicTransformerConfig(**{**base, "max_seq_len": n + 1,
                                     "max_relative_position": (n + 1) // 2}, attn_impl="skew")
    sp = {c: sampling_tokens_per_s(scfg, n, c, dev, dtype) for c in (True, False)}
    print(f"sample {n} tokens: cache {sp[True]:.1f} tok/s, no cache {sp[False]:.1f} tok/s, "
          f"ratio {sp[True] / sp[False]:.1f}x")
    results["sample_tokens_per_s"] = {"cache": sp[True], "no_cache": sp[False]}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
