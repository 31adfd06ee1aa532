"""Moonbeam: events sampled per second with and without the KV cache, and (on a GPU) a LoRA
training step of the 309M architecture, all measured in one run.

    python benchmarks/moonbeam.py                          # CPU: the tiny preset
    python benchmarks/moonbeam.py --device cuda --dtype bf16 --lora-config 309M

Sampling: batch 1, a bare SOS prompt, `--events` events (each = one backbone step + six GRU
steps), window = the preset's context; "no cache" re-runs the whole window every event.
LoRA step (`--lora-config`): random weights in `--dtype`, the reference's LoRA targets,
forward + backward + AdamW at context `--lora-context`, then `--lora-events` sampled events;
peak memory is CUDA `max_memory_allocated` (CPU: not measured).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mehldau.adapters import apply_lora
from mehldau.branches.moonbeam_lora.recipe import model_config
from mehldau.nn.moonbeam import MoonbeamConfig, MoonbeamForCausalLM
from mehldau.recipes.adapt import adapter_config
from mehldau.sampling import SamplingConfig
from mehldau.sampling_compound import EventSampling, sample_events
from mehldau.tokenize.base import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _cfg(preset: str):
    return OmegaConf.create({
        "model": OmegaConf.load(ROOT / f"configs/model/{preset}.yaml"),
        "branch": OmegaConf.load(ROOT / "configs/branch/moonbeam_lora.yaml"),
        "adapter": OmegaConf.load(ROOT / "configs/adapter/lora.yaml")})


def _tokenizer(mcfg: MoonbeamConfig):
    return build_tokenizer("moonbeam", {"onset_vocab_size": mcfg.onset_vocab_size,
                                        "dur_vocab_size": mcfg.dur_vocab_size})


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def sampling_rate(model: MoonbeamForCausalLM, events: int, device: str, use_cache: bool
                  ) -> float:
    tok = _tokenizer(model.config)
    prompt = torch.full((1, 1, 6), -1, device=device)
    opts = EventSampling(SamplingConfig(temperature=1.0, top_p=0.95))
    _sync(device)
    t0 = time.perf_counter()
    rows = sample_events(model, tok, prompt, events, opts, model.config.max_len,
                         generator=torch.Generator(device=device).manual_seed(0),
                         use_cache=use_cache)
    _sync(device)
    return (len(rows[0]) - 1) / (time.perf_counter() - t0)


def lora_step(name: str, context: int, events: int, device: str, dtype: torch.dtype) -> dict:
    cfg = _cfg("moonbeam_309m" if name == "309M" else "moonbeam_839m")
    mcfg = MoonbeamConfig.released(name)
    mcfg.max_len = context
    with torch.device(device):
        model = MoonbeamForCausalLM(mcfg).to(dtype)
    model = apply_lora(model, adapter_config(cfg))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tok = _tokenizer(mcfg)
    g = torch.Generator().manual_seed(0)
    onset = torch.randint(0, 30, (1, context - 1), generator=g).cumsum(1)
    ev = torch.stack([onset, torch.randint(1, 100, (1, context - 1), generator=g),
                      torch.randint(3, 8, (1, context - 1), generator=g),
                      torch.randint(0, 12, (1, context - 1), generator=g),
                      torch.zeros(1, context - 1, dtype=torch.long),
                      torch.randint(30, 110, (1, context - 1), generator=g)], -1)
    rows = torch.cat([torch.full((1, 1, 6), -1), ev], 1)
    labels = torch.as_tensor(tok.to_labels(rows[0].numpy()))[None]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        loss = model(rows.to(device), labels=labels.to(device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    model.eval()
    rate = sampling_rate(model.base_model.model, events, device, True)
    return {"config": name, "context": context, "s_per_step": min(times[1:]),
            "peak_gib": None if peak is None else peak / 2**30, "sample_events_per_s": rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--events", type=int, default=256)
    ap.add_argument("--lora-config", choices=("309M", "839M"), default=None)
    ap.add_argument("--lora-context", type=int, default=1024)
    ap.add_argument("--lora-events", type=int, default=100)
    a = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    model = MoonbeamForCausalLM(model_config(_cfg("moonbeam_tiny"))).to(a.device, dtype).eval()
    res = {"device": a.device, "dtype": a.dtype, "threads": torch.get_num_threads()}
    cached = sampling_rate(model, a.events, a.device, True)
    plain = sampling_rate(model, a.events, a.device, False)
    res.update(tiny_cache_events_per_s=cached, tiny_no_cache_events_per_s=plain)
    print(f"tiny preset, {a.events} events, window {model.config.max_len}: cache "
          f"{cached:.1f} events/s, no cache {plain:.1f} events/s, ratio {cached / plain:.1f}x")
    if a.lora_config:
        r = lora_step(a.lora_config, a.lora_context, a.lora_events, a.device, dtype)
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB"
        print(f"{r['config']} LoRA step at context {r['context']}: {r['s_per_step']:.3f} s, "
              f"peak {peak}; sampling {r['sample_events_per_s']:.1f} events/s")
        res["lora"] = r
    print(json.dumps(res))


if __name__ == "__main__":
    main()
