"""The moonbeam_lora branch: Moonbeam (Guo & Dixon 2025) from its released weights, fine-tuned
on Mehldau with LoRA (or trained from scratch when no `init` is given: the tiny preset).

Composed from the core: the compound tokenizer (`mehldau.tokenize.compound`), the model and
its loader (`mehldau.nn.moonbeam`), packed crops (`mehldau.data.packing`), the per-attribute
sampler (`mehldau.sampling_compound`) and the token branches' recipe components
(`mehldau.recipes.autoregressive`). What is specific here: the model preset fixes the
tokenizer's vocabulary, `init=FILE.pt` means "adapt this released checkpoint" (no
`stage=adapt` needed), and generation samples events rather than ids. `context_len` of the
preset is stored as the config's `max_len`, and `model.reference_numerics` (the released
presets: true) in every checkpoint's model config.
"""

from __future__ import annotations

import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from mehldau.data.packing import EventWindowDataset, PackedCropDataset, split_samples
from mehldau.errors import UserError
from mehldau.generation import cap_durations, device_for, generate_seconds, write_scores
from mehldau.nn.moonbeam import MoonbeamConfig, MoonbeamForCausalLM, load_released
from mehldau.recipes import autoregressive as ar
from mehldau.sampling_compound import EventSampling, sample_events
from mehldau.tokenize.base import load_tokenizer
from mehldau.tokenize.compound import EOS, NUM_ATTRIBUTES, CompoundTokenizer
from mehldau.train.checkpoint import resolve_checkpoint

BRANCH = "moonbeam_lora"
_FIELDS = {f.name for f in fields(MoonbeamConfig)} - {"name", "max_len"}


def model_config(cfg: DictConfig) -> MoonbeamConfig:
    """The preset's architecture: a released one, a reference JSON, or the keys given."""
    m = cfg.model
    try:
        if m.get("config_json"):
            mcfg = MoonbeamConfig.from_json(Path(str(m.config_json)).expanduser())
        elif m.get("released"):
            mcfg = MoonbeamConfig.released(str(m.released))
        else:
            mcfg = MoonbeamConfig(name=str(m.get("preset", "custom")),
                                  **{k: m[k] for k in _FIELDS if k in m})
        mcfg.max_len = int(m.get("context_len", mcfg.max_len))
        if mcfg.max_len < 4:
            raise ValueError(f"context_len must be >= 4, got {mcfg.max_len}")
        # numerics, not architecture: a released or JSON config takes the preset's too
        mcfg = replace(mcfg, reference_numerics=m.get("reference_numerics", False))
    except ValueError as e:
        raise UserError(f"bad model config: {e}") from e
    return mcfg


def _tokenizer_config(cfg: DictConfig) -> dict:
    mcfg = model_config(cfg)
    tok = OmegaConf.to_container(cfg.branch.tokenizer.config, resolve=True)
    return {**tok, "fold_pedal": fold_pedal(cfg, tok.get("fold_pedal", "auto")),
            "onset_vocab_size": mcfg.onset_vocab_size, "dur_vocab_size": mcfg.dur_vocab_size}


def fold_pedal(cfg: DictConfig, given: object) -> bool:
    """`branch.tokenizer.config.fold_pedal`: `auto` ignores the pedal when adapting released
    weights, which were pretrained with every controller ignored (a note ends when its key is
    released), so fine-tuning starts from the durations they know; adapting one of our runs
    keeps that run's choice; training from scratch folds the pedal into durations, as the
    other branches' tokens do (what a listener hears as a note's length)."""
    init = cfg.get("init")
    released = init is not None and Path(str(init)).expanduser().is_file()
    if given is None or given == "auto":
        if released:
            return False
        if init is not None:
            return bool(load_tokenizer(resolve_checkpoint(init) / "tokenizer.json")
                        .config.fold_pedal)
        return True
    if not isinstance(given, bool):
        raise UserError(f"branch.tokenizer.config.fold_pedal must be auto, true or false, got "
                        f"'{given}'")
    if given and released:
        print("moonbeam_lora: warning: fold_pedal=true with released weights, which were "
              "pretrained with the pedal ignored: durations start out longer than they know",
              file=sys.stderr)
    return bool(given)


def _unframed(tokens: np.ndarray, tokenizer: CompoundTokenizer) -> np.ndarray:
    return tokens  # the compound tokenizer already writes [SOS] events [EOS] per sample


def unigram_baseline(sequences: list[np.ndarray], tokenizer: CompoundTokenizer) -> float:
    """Nats per event of a model that knows only each attribute's frequencies (Δonset, dur,
    octave, pc, program, velocity): the sum of the six entropies, the unit of our loss."""
    labels = np.concatenate([tokenizer.to_labels(np.concatenate(
        [np.full((1, NUM_ATTRIBUTES), -1), ev])) [1:, 1:] for ev in split_samples(sequences)])
    total = 0.0
    for a in range(NUM_ATTRIBUTES):
        p = np.bincount(labels[:, a]).astype(np.float64)
        p = p[p > 0] / p.sum()
        total += float(-(p * np.log(p)).sum())
    return total


def _load_released(path: Path, mcfg: MoonbeamConfig) -> MoonbeamForCausalLM:
    model = load_released(path, mcfg)
    model.config.max_len = mcfg.max_len
    return model


def train(cfg: DictConfig) -> Path:
    """Adapt released weights (`init=FILE.pt`) or one of our runs (`init=RUN`) with LoRA, or
    train the preset from scratch when no `init` is given."""
    if cfg.style.enabled:
        raise UserError("the moonbeam_lora branch has no style conditioning; drop style.enabled")
    if cfg.init is not None and cfg.stage == "pretrain":
        with open_dict(cfg):
            cfg.stage = "adapt"  # `init=` here always means: adapt that base with LoRA
        print(f"moonbeam_lora: adapting {cfg.init} (stage=adapt)", file=sys.stderr)
    run = ar.start_run(cfg, BRANCH, MoonbeamConfig, _tokenizer_config(cfg), model_config(cfg),
                       foreign_init=True)
    if run.base is not None and run.base.is_file():  # released weights
        model = _load_released(run.base, run.config)
    else:
        model = ar.with_base_weights(MoonbeamForCausalLM(run.config), run)
    length = run.config.max_len

    def crops(seqs: list, prefixes: list | None) -> PackedCropDataset:
        # whole samples ([SOS] events [EOS]) packed into one context, attending within each
        return PackedCropDataset(seqs, length, run.tokenizer, cfg.seed, run.augment)

    ar.plan_memory(cfg, run, model, crops, length, frame=_unframed)
    data = ar.token_data(cfg, run, frame=_unframed, baseline=unigram_baseline)
    train_ds = crops(data.train, None)
    # validation: each piece's events in consecutive windows
    val_ds = EventWindowDataset(data.val, length, run.tokenizer) if data.val else None
    return ar.fit_run(cfg, run, model, train_ds, val_ds, data)


def load_model(ckpt: Path, device: torch.device | str = "cpu", force: bool = False
               ) -> tuple[MoonbeamForCausalLM, CompoundTokenizer]:
    return ar.load_checkpoint(ckpt, MoonbeamForCausalLM, MoonbeamConfig, BRANCH, device, force,
                              load_foreign=_load_released)


def score(ckpt: Path, files: list, device: torch.device | str = "cpu",
          style: str | None = None) -> list:
    """Held-out likelihood: windows of the full context, each scoring its last half."""
    model, tokenizer = load_model(ckpt, device)
    length = model.config.max_len
    return ar.score_files(model, tokenizer, files, lambda seq, prefix: EventWindowDataset(
        [seq], length, tokenizer, stride=(length - 2) // 2), device, style, frame=_unframed)


def merge_checkpoint(cfg: DictConfig, ckpt: Path) -> Path:
    return ar.merge_checkpoint(cfg, ckpt, load_model)


def prompt_rows(tokenizer: CompoundTokenizer, path: str | Path, seconds: float) -> np.ndarray:
    """[SOS] + the events of a MIDI file's first `seconds` (its first sample, no EOS)."""
    rows = ar.prompt_tokens(tokenizer, path, seconds)
    end = np.flatnonzero(rows[:, 0] == EOS)
    return rows[: end[0] if len(end) else len(rows)]


# No style conditioning; `instrument` (+instrument=N) forces the sampled program.
GENERATE_SETTINGS = (ar.GENERATE_SETTINGS - {"style"}) | {"instrument"}


def generate(cfg: DictConfig, ckpt: Path) -> list[Path]:
    device = device_for(cfg.device)
    model, tokenizer = load_model(ckpt, device, bool(cfg.get("force", False)))
    if cfg.get("style") is not None:
        raise UserError("moonbeam_lora models have no style conditioning; drop style=")
    tps = tokenizer.config.ticks_per_second
    seconds = generate_seconds(cfg)
    start = 0.0
    rows = np.full((1, NUM_ATTRIBUTES), -1, np.int64)  # a bare SOS
    if cfg.prompt is not None:
        rows, start = prompt_rows(tokenizer, cfg.prompt, cfg.prompt_seconds), cfg.prompt_seconds
    try:
        opts = EventSampling(ar.sampling_config(cfg), instrument=cfg.get("instrument", 0))
    except ValueError as e:
        raise UserError(str(e)) from e
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    prompt = torch.as_tensor(rows, device=device)[None].repeat(int(cfg.num_samples), 1, 1)
    samples = sample_events(
        model, tokenizer, prompt, int(cfg.max_tokens or 60 * seconds), opts,
        model.config.max_len, generator=gen, max_ticks=round((start + seconds) * tps),
        use_cache=bool(cfg.use_cache), progress=True)
    capped = [cap_durations(tokenizer.decode(r), cfg.get("max_note_seconds"))
              for r in samples]
    return write_scores([s for s, _ in capped], cfg.out, [n for _, n in capped])
