"""The autoregressive recipe every id-based branch composes: pretrain, adapt, generate, merge.

A branch describes itself with a `ModelSpec` (its name, model and config classes, how to crop
training and evaluation windows, how to decode incrementally) and gets the same workflows:

`train(spec, cfg)` wires the core together in this order, each step needing the one before:
pieces (their styles name the style tokens) -> tokenizer (the cache is keyed by its config; in
the adapt stage it comes from the base) -> model config (checked before anything is written)
-> run directory (so skipped.tsv and the split manifest have a home) -> corpus (validated,
tokenized, split by group) -> model -> datasets -> the shared trainer.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from mehldau.adapters import (
    AdapterConfig,
    apply_lora,
    load_adapter,
    merge,
    qlora,
    read_base_pointer,
    save_adapter,
    trainable_parameters,
)
from mehldau.data.corpus import BadMidi, read_score, unigram_entropy
from mehldau.data.dataset import add_bos_eos
from mehldau.data.splits import MANIFEST
from mehldau.errors import UserError
from mehldau.generation import cap_durations, device_for, generate_seconds, write_scores
from mehldau.io import atomic_dir
from mehldau.recipes.run import (
    checkpoint_extras,
    metrics_file,
    run_corpus,
    run_dir_for,
    run_pieces,
)
from mehldau.sampling import Decoder, SamplingConfig, sample_tokens
from mehldau.tokenize.base import Tokenizer, build_tokenizer, load_tokenizer
from mehldau.train.checkpoint import (
    WEIGHTS,
    load_weights,
    read_meta,
    resolve_checkpoint,
    save_weights,
)
from mehldau.train.loggers import make_logger
from mehldau.train.trainer import TrainConfig, evaluate, fit, make_accelerator


@dataclass(frozen=True)
class ModelSpec:
    branch: str  # the name in checkpoints' meta.json and configs/branch/<name>.yaml
    recipe: str  # module whose train/generate/merge_checkpoint the CLI calls
    model_class: type[torch.nn.Module]  # built as model_class(config); has .config.to_dict()
    config_class: type  # a dataclass; ValueError on bad values
    config_keys: tuple[str, ...]  # the keys of cfg.model passed to config_class
    # (sequences, model config, tokenizer, seed, cfg.augment, style prefixes) -> training set
    train_dataset: Callable[..., Dataset]
    # (sequences, model config, tokenizer, style prefixes) -> evaluation windows
    eval_dataset: Callable[..., Dataset]
    # (model, use_cache, prefix_len) -> incremental decoder for sampling
    decoder: Callable[[torch.nn.Module, bool, int], Decoder] | None = None
    # (sequences, model config, tokenizer, style prefixes) -> windows of the likelihood
    # policy (`mehldau.evaluation.likelihood`); default: eval_dataset
    score_dataset: Callable[..., Dataset] | None = None
    # Hooks for a model whose tokens are not one id each (Moonbeam's compound rows):
    # (cfg) -> the tokenizer's config (default: cfg.branch.tokenizer.config)
    tokenizer_config: Callable[[DictConfig], dict] | None = None
    # (cfg, tokenizer) -> model config (default: cfg.model's config_keys + the vocab size)
    build_config: Callable[[DictConfig, Tokenizer], Any] | None = None
    # (piece's tokens, tokenizer) -> the sequence the datasets see (default: BOS + EOS added)
    frame: Callable[[np.ndarray, Tokenizer], np.ndarray] | None = None
    # (sequences, tokenizer) -> the unigram baseline, nats per target (metrics.jsonl line 1)
    baseline: Callable[[list[np.ndarray], Tokenizer], float] | None = None
    # (file, model config) -> model: `init=FILE` names a base in a foreign format (the
    # released Moonbeam .pt) instead of one of our checkpoint directories
    load_foreign: Callable[[Path, Any], torch.nn.Module] | None = None


def model_config(spec: ModelSpec, cfg: DictConfig, tokenizer: Tokenizer) -> Any:
    try:
        if spec.build_config is not None:
            return spec.build_config(cfg, tokenizer)
        return spec.config_class(vocab_size=tokenizer.vocab_size,
                                 **{k: cfg.model[k] for k in spec.config_keys if k in cfg.model})
    except ValueError as e:
        raise UserError(f"bad model config: {e}") from e


def adapter_config(cfg: DictConfig) -> AdapterConfig:
    """`adapter` (lora|qlora) over the branch's defaults: a null there (alpha, targets) takes
    `branch.adapter`, so `adapter=qlora` adapts each model where its paper does."""
    given = OmegaConf.to_container(cfg.adapter, resolve=True)
    defaults = OmegaConf.to_container(cfg.branch.get("adapter") or {}, resolve=True)
    return AdapterConfig(**{**defaults, **{k: v for k, v in given.items() if v is not None}})


def _tokenizer_config(spec: ModelSpec, cfg: DictConfig) -> dict:
    if spec.tokenizer_config is not None:
        return spec.tokenizer_config(cfg)
    return OmegaConf.to_container(cfg.branch.tokenizer.config, resolve=True)


def train(spec: ModelSpec, cfg: DictConfig) -> Path:
    try:
        tcfg = TrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))
    except TypeError as e:
        raise UserError(f"bad train config: {e}; see configs/train/default.yaml") from e
    run_dir = run_dir_for(cfg, f"{spec.branch}/", tcfg.resume)
    if cfg.stage not in ("pretrain", "adapt"):
        raise UserError(f"unknown stage '{cfg.stage}'; use stage=pretrain or stage=adapt")
    adapt = cfg.stage == "adapt"
    base_ckpt = None
    pieces = run_pieces(cfg)
    styles = sorted({_style_of(p, cfg) for p in pieces}) if cfg.style.enabled else []
    if adapt:
        base_ckpt, tokenizer, mcfg = _adapt_base(spec, cfg)
        acfg = adapter_config(cfg)
        if acfg.kind == "qlora":
            qlora.import_bnb()  # fail before anything is written
        if tokenizer.styles:  # the base is style-conditioned: every piece needs a known style
            for name in {_style_of(p, cfg) for p in pieces}:
                _checked_style_id(tokenizer, name)
        elif cfg.style.enabled:
            raise UserError(f"init {base_ckpt} was trained without style conditioning; drop "
                            "style.enabled")
    else:
        if cfg.init is not None:
            raise UserError("init= is for stage=adapt; add stage=adapt adapter=lora|qlora")
        tok_cfg = _tokenizer_config(spec, cfg)
        tokenizer = build_tokenizer(cfg.branch.tokenizer.name,
                                    {**tok_cfg, "styles": styles} if styles else tok_cfg)
        mcfg = model_config(spec, cfg, tokenizer)  # validated before anything is written
    corpus = run_corpus(cfg, pieces, tokenizer, run_dir, base_ckpt)
    frame = spec.frame or add_bos_eos
    seqs = {s: [frame(x, tokenizer) for x in corpus.sequences(s)] for s in corpus.splits}
    if not seqs["train"]:
        raise UserError("the training split is empty; use more files or change split.ratios")
    # The no-context baseline is fitted on the training split alone: a baseline that has seen
    # the val/test tokens' frequencies would flatter itself.
    train_seqs = corpus.sequences("train")
    all_seqs = [x for s in corpus.splits for x in corpus.sequences(s)]
    metrics, fresh = metrics_file(run_dir, tcfg.resume, {
        "unigram_entropy": spec.baseline(train_seqs, tokenizer) if spec.baseline is not None
        else unigram_entropy(train_seqs, tokenizer.vocab_size),
        "baseline_from": "train", "tokens": int(sum(len(x) for x in all_seqs)),
        "pieces": len(all_seqs), "skipped": len(corpus.skipped)})

    set_seed(cfg.seed)
    if base_ckpt is not None and base_ckpt.is_file():
        model = spec.load_foreign(base_ckpt, mcfg)
    else:
        model = spec.model_class(mcfg)
        if base_ckpt is not None:
            load_weights(model, base_ckpt, spec.branch)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {spec.branch}, {n_params / 1e6:.2f}M parameters"
          + (f", adapting {base_ckpt}" if adapt else ""), file=sys.stderr)
    prefixes = {s: [np.array([tokenizer.style_id(_style_of(p, cfg))]) for p, _ in pairs]
                if tokenizer.styles else None for s, pairs in corpus.splits.items()}
    aug = cfg.augment
    train_ds = spec.train_dataset(seqs["train"], mcfg, tokenizer, cfg.seed, aug,
                                  prefixes["train"])
    val_ds = spec.eval_dataset(seqs["val"], mcfg, tokenizer,
                               prefixes["val"]) if seqs["val"] else None
    if val_ds is None:
        print("train: no validation split (fewer than 3 groups); no val loss", file=sys.stderr)

    accelerator = make_accelerator(tcfg.mixed_precision)
    hooks: dict = {}
    if adapt:
        if cfg.report_base_loss and val_ds is not None and fresh:
            base_val = evaluate(model.to(accelerator.device), val_ds, accelerator,
                                tcfg.eval_batch_size, tcfg.eval_max_batches)
            metrics.write({"step": 0, "split": "val", "loss": round(base_val, 5),
                           "model": "base"})
            print(f"base val loss before adapting: {base_val:.4f} nats/{tokenizer.step_name}",
                  file=sys.stderr)
        model, hooks = _with_adapter(model, acfg, base_ckpt, accelerator.device)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    write_extra = checkpoint_extras(cfg, tokenizer, mcfg.to_dict(), run_dir)
    meta = {"branch": spec.branch, "recipe": spec.recipe,
            "model": spec.model_class.__name__, "stage": cfg.stage}
    if adapt:
        meta["adapter"] = acfg.kind
    logger = make_logger(cfg.logger, run_dir, resolved, resume=tcfg.resume)
    try:
        last = fit(model, train_ds, val_ds, tcfg, run_dir, meta, write_extra, logger,
                   accelerator=accelerator, loss_unit=f"nats/{tokenizer.step_name}",
                   **hooks)
    finally:
        logger.finish()
    if "val_loss" in last:
        print(f"final val loss {last['val_loss']:.4f} nats/{tokenizer.step_name}", file=sys.stderr)
    return run_dir


def _style_of(piece, cfg: DictConfig) -> str:
    return cfg.style.name if cfg.style.get("name") else piece.style


def _checked_style_id(tokenizer: Tokenizer, name: str) -> int:
    try:
        return tokenizer.style_id(name)
    except UserError as e:
        raise UserError(f"{e}; the base does not know the data's style: set style.name to "
                        "one of them") from e


def _adapt_base(spec: ModelSpec, cfg: DictConfig) -> tuple[Path, Tokenizer, Any]:
    """The checkpoint to adapt, its tokenizer and architecture, checked."""
    if cfg.init is None:
        raise UserError(f"stage=adapt needs init=<a {spec.branch} run or checkpoint directory>")
    if spec.load_foreign is not None and Path(str(cfg.init)).expanduser().is_file():
        base = Path(str(cfg.init)).expanduser().resolve()  # e.g. a released Moonbeam .pt
        tokenizer = build_tokenizer(cfg.branch.tokenizer.name, _tokenizer_config(spec, cfg))
        return base, tokenizer, model_config(spec, cfg, tokenizer)
    base = resolve_checkpoint(cfg.init)
    meta = read_meta(base)
    if meta.get("branch") != spec.branch:
        raise UserError(f"init {base} is a '{meta.get('branch')}' checkpoint; the {spec.branch} "
                        f"branch adapts {spec.branch} checkpoints")
    if meta.get("stage") == "adapt":
        raise UserError(f"init {base} is itself an adapter; merge it first (mehldau-merge "
                        "ckpt=... out=DIR) and adapt the merged checkpoint")
    tokenizer = load_tokenizer(base / "tokenizer.json")
    wanted = build_tokenizer(cfg.branch.tokenizer.name, {
        **_tokenizer_config(spec, cfg), **({"styles": tokenizer.styles} if tokenizer.styles
                                          else {})})
    if wanted.name != tokenizer.name:
        raise UserError(f"init {base} was trained with the '{tokenizer.name}' tokenizer, the "
                        f"branch's is '{wanted.name}'; adapting keeps the base's: add "
                        f"branch.tokenizer.name={tokenizer.name}")
    if wanted != tokenizer:
        raise UserError(f"branch.tokenizer differs from the tokenizer of init {base}; adapting "
                        "uses the base's tokenizer, so drop the branch.tokenizer override")
    return base, tokenizer, read_model_config(spec, base)


def _with_adapter(model: torch.nn.Module, acfg: AdapterConfig, base_ckpt: Path,
                  device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Freeze the base (in 4-bit for QLoRA), add LoRA; hooks so the trainer saves adapters."""
    if acfg.kind == "qlora":
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        qlora.quantize_4bit(model, compute, device)
    model = apply_lora(model, acfg)
    trainable, total = trainable_parameters(model)
    print(f"adapter {acfg.kind}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f} %)", file=sys.stderr)

    def write_weights(m: torch.nn.Module, d: Path) -> None:
        save_adapter(m, d, base_ckpt, WEIGHTS)

    def read_weights(m: torch.nn.Module, d: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(m, load_file(str(d / "adapter" / "adapter_model.safetensors")))

    hooks: dict = {"write_weights": write_weights, "read_weights": read_weights}
    if acfg.kind == "qlora":
        hooks["make_optimizer"] = lambda m, c: qlora.make_optimizer(
            [p for p in m.parameters() if p.requires_grad], c.lr, c.weight_decay,
            (c.beta1, c.beta2), device)
    return model, hooks


# --- generation ---------------------------------------------------------------------------
def read_model_config(spec: ModelSpec, ckpt: Path) -> Any:
    try:
        return spec.config_class(**json.loads((ckpt / "model_config.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{ckpt} has no usable model_config.json ({e}); it is not a "
                        f"{spec.branch} checkpoint") from e


def load_model(spec: ModelSpec, ckpt: Path, device: torch.device | str = "cpu",
               force: bool = False) -> tuple[torch.nn.Module, Tokenizer]:
    """A plain model from a checkpoint; an adapter checkpoint is loaded onto its base and
    merged (the adapter is checked against the base's recorded hash unless `force`)."""
    if read_meta(ckpt).get("stage") == "adapt":
        base = read_base_pointer(ckpt, WEIGHTS, force=force)
        if base.is_file():  # a foreign base (init=FILE): our tokenizer and config are here
            model = spec.load_foreign(base, read_model_config(spec, ckpt))
            tokenizer = load_tokenizer(ckpt / "tokenizer.json")
        else:
            model, tokenizer = load_model(spec, base, "cpu")
        model = merge(load_adapter(model, ckpt))
        return model.to(device).eval(), tokenizer
    tokenizer = load_tokenizer(ckpt / "tokenizer.json")
    model = spec.model_class(read_model_config(spec, ckpt))
    load_weights(model, ckpt, spec.branch)
    return model.to(device).eval(), tokenizer


def prompt_tokens(tokenizer: Tokenizer, path: str | Path, seconds: float) -> np.ndarray:
    """The first `seconds` of a MIDI file as tokens: the notes that start before the cut.

    Tokens that carry durations keep each note's whole duration (and the pedal that holds
    it), so the continuation starts with the notes sounding that the pianist left sounding.
    Note-on/note-off tokens end every note at the cut: a note left open would need the model
    to close it."""
    try:
        score = read_score(path)
    except BadMidi as e:
        raise UserError(f"prompt {path}: {e}; pass a MIDI file with notes") from e
    secs = score.to("second")
    if tokenizer.note_durations:
        clipped = secs.copy()
        for track in clipped.tracks:
            track.notes = track.notes.filter(lambda n: n.time < float(seconds), inplace=False)
    else:
        clipped = secs.clip(0, float(seconds), clip_end=False)
        for track in clipped.tracks:
            for note in track.notes:
                note.duration = min(note.duration, float(seconds) - note.time)
    tokens = tokenizer.encode(clipped)
    if len(tokens) == 0:
        raise UserError(f"prompt {path} has no piano notes in its first {seconds} s; "
                        "raise prompt_seconds or use another file")
    # The continuation starts at the cut, not at the prompt's last event (ids that carry
    # time only; Moonbeam's rows cannot say "silence until here").
    shifts = tokenizer.time_shift_ids(float(seconds) - tokenizer.seconds_of(tokens))
    return np.concatenate([tokens, shifts]).astype(tokens.dtype) if len(shifts) else tokens


def generate(spec: ModelSpec, cfg: DictConfig, ckpt: Path) -> list[Path]:
    device = device_for(cfg.device)
    model, tokenizer = load_model(spec, ckpt, device, force=bool(cfg.get("force", False)))
    sp = tokenizer.special_tokens
    prefix: list[int] = []
    if cfg.get("style") is not None:
        prefix = [tokenizer.style_id(str(cfg.style))]
    elif tokenizer.styles:
        raise UserError(f"this model is style-conditioned: add style=NAME, one of: "
                        f"{', '.join(tokenizer.styles)}")
    prompt = np.array([*prefix, sp["bos"]], dtype=np.int64)
    if cfg.prompt is not None:
        prompt = np.concatenate([prompt, prompt_tokens(tokenizer, cfg.prompt, cfg.prompt_seconds)])
    try:
        scfg = SamplingConfig(cfg.temperature, cfg.top_k, cfg.top_p)
    except ValueError as e:
        raise UserError(str(e)) from e
    seconds = generate_seconds(cfg)
    max_tokens = cfg.max_tokens or int(200 * seconds)
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    torch.manual_seed(int(cfg.seed))
    batch = torch.as_tensor(prompt, device=device)[None].repeat(int(cfg.num_samples), 1)
    seqs = sample_tokens(
        spec.decoder(model, bool(cfg.use_cache), len(prefix)), batch, max_tokens, scfg,
        generator=gen, eos_id=sp["eos"],
        seconds_per_id=torch.as_tensor(tokenizer.seconds_per_id(), dtype=torch.float32,
                                       device=device),
        max_seconds=seconds, progress=True,
        # The user asked for a duration: never end early, never emit structural tokens.
        banned_ids=(sp["pad"], sp["bos"], sp["eos"], *range(
            tokenizer.vocab_size - len(tokenizer.styles), tokenizer.vocab_size)),
        allowed_next=_grammar(tokenizer, device),
    )
    capped = [cap_durations(tokenizer.decode(row.cpu().numpy()), cfg.get("max_note_seconds"))
              for row in seqs]
    return write_scores([s for s, _ in capped], cfg.out, [n for _, n in capped])


def _grammar(tokenizer: Tokenizer, device: torch.device) -> torch.Tensor | None:
    mask = tokenizer.next_token_mask()
    return None if mask is None else torch.as_tensor(mask, device=device)


# --- held-out likelihood --------------------------------------------------------------------
def score(spec: ModelSpec, ckpt: Path, files: list[tuple[str, Path]],
          device: torch.device | str = "cpu", style: str | None = None,
          batch_size: int = 8) -> list:
    """Each file's summed nats under the checkpoint, with its notes and seconds as the
    tokenizer reads them (`mehldau.evaluation.likelihood`'s policy). Unreadable files are
    skipped with a line on stderr."""
    from mehldau.evaluation.likelihood import piece_size, score_pieces

    model, tokenizer = load_model(spec, ckpt, device)
    mcfg = model.config
    prefix = None
    if tokenizer.styles:
        if style is None:
            raise UserError(f"{ckpt} is style-conditioned: name the style to score with")
        prefix = np.array([_checked_style_id(tokenizer, style)])
    frame = spec.frame or add_bos_eos
    make = spec.score_dataset or spec.eval_dataset
    pieces = []
    for pid, path in files:
        try:
            midi = read_score(path)
            tokens = tokenizer.encode(midi)
        except BadMidi as e:
            print(f"score: skipped {path}: {e}", file=sys.stderr)
            continue
        if len(tokens) == 0:
            print(f"score: skipped {path}: no notes in the piano range", file=sys.stderr)
            continue
        pieces.append((pid, frame(tokens, tokenizer), *piece_size(midi)))
    return score_pieces(
        model, lambda seq: make([seq], mcfg, tokenizer, None if prefix is None else [prefix]),
        pieces, device, batch_size)


# --- merging --------------------------------------------------------------------------------
def merge_checkpoint(spec: ModelSpec, cfg: DictConfig, ckpt: Path) -> Path:
    """Base + adapter folded into one plain checkpoint that loads without peft."""
    if read_meta(ckpt).get("stage") != "adapt":
        raise UserError(f"{ckpt} is not an adapter checkpoint; nothing to merge")
    out = Path(cfg.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new out= directory")
    model, tokenizer = load_model(spec, ckpt, "cpu", force=bool(cfg.force))
    meta = {**read_meta(ckpt), "stage": "pretrain", "merged_from": str(ckpt.resolve())}
    meta.pop("adapter", None)
    with atomic_dir(out) as tmp:
        save_weights(model, tmp, meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / "model_config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
        for name in ("config.yaml", MANIFEST):
            if (ckpt / name).is_file():
                (tmp / name).write_text((ckpt / name).read_text())
    return out
