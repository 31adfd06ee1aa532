"""Components of the token branches' recipes (production, perceiver_mt, moonbeam_lora): the
steps every model that predicts the next token takes the same way. Each branch's `recipe.py`
calls them in order, with its own model, datasets and decoder in between:

    train:    start_run -> (model) -> plan_memory -> token_data -> (datasets) -> fit_run
    generate: load_checkpoint -> id_prompt -> (decoder) -> sample_ids
    score:    load_checkpoint -> (windows) -> score_files
    merge:    merge_checkpoint

`start_run` wires the steps whose order matters: the pieces (their styles name the style
tokens) come before the tokenizer (the cache is keyed by its config; when adapting it is the
base's), and the model config is checked before `token_data` writes the run directory.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from mehldau.adapters import AdapterConfig, load_adapter, merge, qlora, read_base_pointer
from mehldau.data.corpus import BadMidi, read_score, unigram_entropy
from mehldau.data.dataset import Augmentation, add_bos_eos
from mehldau.data.sources import Piece
from mehldau.data.splits import LINEAGE, MANIFEST, lineage_of, write_lineage
from mehldau.errors import UserError
from mehldau.generation import (
    StreamedNote,
    cap_durations,
    device_for,
    generate_seconds,
    stream_notes,
    write_scores,
)
from mehldau.io import atomic_dir
from mehldau.recipes import adapt
from mehldau.recipes import run as setup
from mehldau.sampling import Decoder, SamplingConfig, sample_tokens, stream_tokens
from mehldau.settings import checked
from mehldau.tokenize.base import Tokenizer, build_tokenizer, load_tokenizer
from mehldau.tokenize.notes import cut_prompt
from mehldau.tokenize.performance import NUM_SPECIAL
from mehldau.train.checkpoint import WEIGHTS, load_weights, read_meta, save_weights
from mehldau.train.loggers import MetricsFile
from mehldau.train.trainer import TrainConfig, make_accelerator


# --- training ---------------------------------------------------------------------------------
@dataclass
class Run:
    """What a training run knows before it reads any MIDI."""

    branch: str
    train: TrainConfig
    dir: Path
    pieces: list[Piece]
    tokenizer: Tokenizer
    config: Any  # the model's config dataclass
    augment: Augmentation  # of training crops
    accelerator: Any  # devices, precision and processes (accelerate)
    base: Path | None = None  # stage=adapt: the checkpoint dir (or foreign file) adapted
    adapter: AdapterConfig | None = None  # stage=adapt: LoRA or QLoRA


def start_run(cfg: DictConfig, branch: str, config_class: type,
              tokenizer_config: dict | None = None, config: Any = None,
              foreign_init: bool = False) -> Run:
    """Stage, run directory (refused if it holds another run), pieces, tokenizer, model
    config and augmentation, all checked before anything is written.

    Pretraining: a new tokenizer from `tokenizer_config` (default `branch.tokenizer.config`)
    with a style token per style the pieces have, and `config` (default: `config_class` from
    `cfg.model` and the vocabulary size). Adapting: the base's tokenizer and architecture.
    `foreign_init`: `init=FILE` names weights in another format (the released Moonbeam .pt),
    adapted with a new tokenizer and `config`."""
    tcfg = setup.train_config(cfg)
    augment = Augmentation.from_config(cfg.augment)
    accelerator = make_accelerator(tcfg.mixed_precision)
    run_dir = setup.run_dir_for(cfg, f"{branch}/", tcfg.resume)
    accelerator.wait_for_everyone()  # every process checked the run dir before any writes
    if cfg.stage not in ("pretrain", "adapt"):
        raise UserError(f"unknown stage '{cfg.stage}'; use stage=pretrain or stage=adapt")
    if cfg.stage == "pretrain" and config is None:
        # checked before any file is listed; the vocabulary size comes from the tokenizer
        model_config(config_class, cfg.model, vocab_size=NUM_SPECIAL + 1)
    pieces = setup.run_pieces(cfg)
    name = cfg.branch.tokenizer.name
    if tokenizer_config is None:
        tokenizer_config = OmegaConf.to_container(cfg.branch.tokenizer.config, resolve=True)
    if cfg.stage == "pretrain":
        if cfg.init is not None:
            raise UserError("init= is for stage=adapt; add stage=adapt adapter=lora|qlora")
        styles = sorted({adapt.style_of(p, cfg) for p in pieces}) if cfg.style.enabled else []
        tokenizer = build_tokenizer(name, {**tokenizer_config, "styles": styles} if styles
                                    else tokenizer_config)
        if config is None:
            config = model_config(config_class, cfg.model, vocab_size=tokenizer.vocab_size)
        set_seed(cfg.seed)  # the model is built next: its initial weights depend on seed alone
        return Run(branch, tcfg, run_dir, pieces, tokenizer, config, augment, accelerator)
    if foreign_init and cfg.init is not None and Path(str(cfg.init)).expanduser().is_file():
        base = Path(str(cfg.init)).expanduser().resolve()
        tokenizer = build_tokenizer(name, tokenizer_config)
    else:
        base = adapt.base_checkpoint(cfg, branch)
        tokenizer = adapt.base_tokenizer(base, name, tokenizer_config)
        config = read_model_config(config_class, base)
    acfg = adapt.adapter_config(cfg)
    if acfg.kind == "qlora":
        qlora.import_bnb()  # fail before anything is written
    adapt.check_styles(tokenizer, pieces, cfg, base)
    set_seed(cfg.seed)
    return Run(branch, tcfg, run_dir, pieces, tokenizer, config, augment, accelerator, base,
               acfg)


def model_config(config_class: type, model: DictConfig, **given: Any) -> Any:
    """`config_class` from the keys of `model` (cfg.model) that are its fields, and `given`;
    a bad value is a one-line user error."""
    keys = {f.name for f in fields(config_class)} - set(given)
    return checked(config_class, {k: model[k] for k in keys if k in model}, "model", **given)


@dataclass
class TokenData:
    """The framed sequences of each split, the style prefix of each sequence (None when the
    tokenizer has no styles) and the run's metrics file."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    prefixes: dict[str, list[np.ndarray] | None]
    metrics: MetricsFile
    fresh: bool  # this run wrote metrics.jsonl's header (not a resume of an earlier one)


def token_data(cfg: DictConfig, run: Run,
               frame: Callable[[np.ndarray, Tokenizer], np.ndarray] = add_bos_eos,
               baseline: Callable[[list[np.ndarray], Tokenizer], float] | None = None
               ) -> TokenData:
    """The corpus, split and tokenized (`run_corpus`), each piece framed for the datasets
    (default: BOS + tokens + EOS), and metrics.jsonl's header. `baseline`: nats per target of
    a model without context (default: the token unigram)."""
    tokenizer = run.tokenizer
    corpus = setup.run_corpus(cfg, run.pieces, tokenizer, run.dir, run.base, run.train.resume,
                              run.accelerator)
    seqs = {s: [frame(x, tokenizer) for x in corpus.sequences(s)] for s in corpus.splits}
    if not seqs["train"]:
        raise UserError("the training split is empty; use more files or change split.ratios")
    # The no-context baseline is fitted on the training split alone: a baseline that has seen
    # the val/test tokens' frequencies would flatter itself.
    train_seqs = corpus.sequences("train")
    all_seqs = [x for s in corpus.splits for x in corpus.sequences(s)]
    metrics, fresh = setup.metrics_file(run.dir, run.train.resume, {
        "unigram_entropy": baseline(train_seqs, tokenizer) if baseline is not None
        else unigram_entropy(train_seqs, tokenizer.vocab_size),
        "baseline_from": "train", "tokens": int(sum(len(x) for x in all_seqs)),
        "pieces": len(all_seqs), "skipped": len(corpus.skipped)}, run.accelerator.is_main_process)
    prefixes = {s: [np.array([tokenizer.style_id(adapt.style_of(p, cfg))]) for p, _ in pairs]
                if tokenizer.styles else None for s, pairs in corpus.splits.items()}
    return TokenData(seqs["train"], seqs["val"], prefixes, metrics, fresh)


def plan_memory(cfg: DictConfig, run: Run, model: torch.nn.Module,
                crops: Callable[[list[np.ndarray], list[np.ndarray] | None], Dataset],
                context: int,
                frame: Callable[[np.ndarray, Tokenizer], np.ndarray] = add_bos_eos) -> None:
    """Before any data is read: the memory plan of training `model` on `crops` (the branch's
    training dataset over given sequences) of `context` tokens, from a made-up piece
    (`recipes.run.plan_memory`), and the adapter's targets checked against `model`. Resolves
    `train.micro_batch_size=auto`."""
    if run.adapter is not None:  # adapter.targets named modules of this model, or one line
        run.adapter.target_modules(model)
    piece = run.tokenizer.encode(setup.made_up_score(context + 8))  # >= 1 token a note
    items = crops([frame(piece, run.tokenizer)], None)
    run.train = setup.plan_memory(run.train, run.accelerator, model, items, run.adapter)


def with_base_weights(model: torch.nn.Module, run: Run) -> torch.nn.Module:
    """The model with the adapted checkpoint's weights (unchanged when pretraining)."""
    if run.base is not None:
        load_weights(model, run.base, run.branch)
    return model


def fit_run(cfg: DictConfig, run: Run, model: torch.nn.Module, train_ds: Dataset,
            val_ds: Dataset | None, data: TokenData) -> Path:
    """Train (stage=adapt: the base's val loss first, then an adapter on the frozen base)
    and write checkpoints that carry the config, tokenizer, model config and splits."""
    accelerator = run.accelerator
    n_params = sum(p.numel() for p in model.parameters())
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    say(f"model: {run.branch}, {n_params / 1e6:.2f}M parameters"
        + (f", adapting {run.base}" if run.base is not None else ""), file=sys.stderr)
    if val_ds is None:
        say("train: no piece was dealt to val (see split.seed, split.ratios); no val loss",
            file=sys.stderr)
    meta = {"branch": run.branch, "recipe": f"mehldau.branches.{run.branch}.recipe",
            "model": type(model).__name__, "stage": cfg.stage}
    unit = f"nats/{run.tokenizer.step_name}"
    hooks: dict = {}
    if run.adapter is not None:
        meta["adapter"] = run.adapter.kind
        model = adapt.frozen_base(model, run.adapter, accelerator.device)
        if cfg.report_base_loss and val_ds is not None and data.fresh:  # the base adapted:
            adapt.report_base_loss(model, val_ds, accelerator, run.train, data.metrics, unit)
        model, hooks = adapt.with_adapter(model, run.adapter, run.base, accelerator.device)
    write_extra = setup.checkpoint_extras(cfg, run.tokenizer, run.config.to_dict(), run.dir)
    setup.fit_logged(cfg, run.train, run.dir, model, train_ds, val_ds, meta, write_extra,
                     accelerator, unit, **hooks)
    return run.dir


# --- checkpoints ------------------------------------------------------------------------------
def read_model_config(config_class: type, ckpt: Path) -> Any:
    try:
        return config_class(**json.loads((ckpt / "model_config.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{ckpt} has no usable model_config.json ({e}); it is not a "
                        f"{read_meta(ckpt).get('branch', 'mehldau')} checkpoint of this "
                        "branch") from e


def load_checkpoint(ckpt: Path, model_class: type[torch.nn.Module], config_class: type,
                    branch: str, device: torch.device | str = "cpu", force: bool = False,
                    load_foreign: Callable[[Path, Any], torch.nn.Module] | None = None
                    ) -> tuple[torch.nn.Module, Tokenizer]:
    """A plain model in eval mode and its tokenizer. An adapter checkpoint is loaded onto its
    base and merged (checked against the base's recorded hash unless `force`); a base that
    is a file (`init=FILE` when adapting) is read by `load_foreign(file, model config)`."""
    meta = read_meta(ckpt)
    if meta.get("stage") == "adapt":
        base = read_base_pointer(ckpt, WEIGHTS, force=force)
        if base.is_file():  # a foreign base: our tokenizer and config are in the adapter's dir
            if load_foreign is None:
                raise UserError(f"{ckpt} adapts the file {base}, which the {branch} branch "
                                "cannot read; it names a directory checkpoint as its base")
            model = load_foreign(base, read_model_config(config_class, ckpt))
            tokenizer = load_tokenizer(ckpt / "tokenizer.json")
        else:
            model, tokenizer = load_checkpoint(base, model_class, config_class, branch)
        if meta.get("adapter") == "qlora":
            # The adapter learned to correct the 4-bit base, not the original weights.
            qlora.nf4_round_trip(model)
            print(f"{ckpt.name}: QLoRA adapter on its base's NF4 weights (dequantized), as "
                  "trained", file=sys.stderr)
        model = merge(load_adapter(model, ckpt))
        return model.to(device).eval(), tokenizer
    tokenizer = load_tokenizer(ckpt / "tokenizer.json")
    model = model_class(read_model_config(config_class, ckpt))
    load_weights(model, ckpt, branch)
    return model.to(device).eval(), tokenizer


def merge_checkpoint(cfg: DictConfig, ckpt: Path,
                     load_model: Callable[..., tuple[torch.nn.Module, Tokenizer]]) -> Path:
    """Base + adapter folded into one plain checkpoint at `cfg.out` that loads without peft.
    It keeps the adapter run's config and manifest, and its lineage: the base it adapted and
    that base's ancestors, whose data is in the merged weights too (an adapter checkpoint
    from before lineage files gets one from its `base.json`). `load_model(ckpt, device,
    force)`: the branch's loader."""
    if read_meta(ckpt).get("stage") != "adapt":
        raise UserError(f"{ckpt} is not an adapter checkpoint; nothing to merge")
    out = Path(cfg.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new out= directory")
    model, tokenizer = load_model(ckpt, "cpu", bool(cfg.force))
    meta = {**read_meta(ckpt), "stage": "pretrain", "merged_from": str(ckpt.resolve())}
    if meta.pop("adapter", None) == "qlora":
        meta["base_weights"] = "NF4 round trip of the base (what the QLoRA adapter trained on)"
    with atomic_dir(out) as tmp:
        save_weights(model, tmp, meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / "model_config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
        for name in ("config.yaml", MANIFEST):
            if (ckpt / name).is_file():
                (tmp / name).write_text((ckpt / name).read_text())
        write_lineage(lineage_of(ckpt), tmp / LINEAGE)
    return out


# --- generation -------------------------------------------------------------------------------
# The mehldau-generate settings `id_prompt` and `sample_ids` read (a branch recipe's
# GENERATE_SETTINGS; anything else a user sets is refused by mehldau-generate).
GENERATE_SETTINGS = frozenset({
    "prompt", "prompt_seconds", "seconds", "max_tokens", "temperature", "top_k", "top_p",
    "seed", "num_samples", "use_cache", "max_note_seconds", "style", "force", "device"})

def prompt_tokens(tokenizer: Tokenizer, path: str | Path, seconds: float) -> np.ndarray:
    """The first `seconds` of a MIDI file as tokens, cut by `notes.cut_prompt` (the notes that
    start before the cut, a pedal still down at the cut lifted there), as mehldau-compare's
    prompts are.

    Tokens that carry durations keep each note's whole duration (as the key was held), so
    the continuation starts with the notes sounding that the pianist left sounding.
    Note-on/note-off tokens end every note at the cut: a note left open would need the model
    to close it."""
    try:
        score = read_score(path)
    except BadMidi as e:
        raise UserError(f"prompt {path}: {e}; pass a MIDI file with notes") from e
    clipped = cut_prompt(score, float(seconds))
    if not tokenizer.note_durations:
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


def id_prompt(tokenizer: Tokenizer, cfg: DictConfig) -> tuple[np.ndarray, int]:
    """What sampling continues: [style] BOS [the prompt file's first `prompt_seconds`], and
    the length of the style prefix (decoders keep it when they slide past the context)."""
    prefix: list[int] = []
    if cfg.get("style") is not None:
        prefix = [tokenizer.style_id(str(cfg.style))]
    elif tokenizer.styles:
        raise UserError(f"this model is style-conditioned: add style=NAME, one of: "
                        f"{', '.join(tokenizer.styles)}")
    prompt = np.array([*prefix, tokenizer.special_tokens["bos"]], dtype=np.int64)
    if cfg.prompt is not None:
        prompt = np.concatenate([prompt, prompt_tokens(tokenizer, cfg.prompt, cfg.prompt_seconds)])
    return prompt, len(prefix)


def sampling_config(cfg: DictConfig) -> SamplingConfig:
    """temperature, top_k and top_p of mehldau-generate, typed and in range."""
    return checked(SamplingConfig, {k: cfg[k] for k in ("temperature", "top_k", "top_p")}, "")


def decoding(cfg: DictConfig, ckpt: Path, load: Callable[..., tuple[Any, Tokenizer]],
             make_decoder: Callable[[Any, int], Decoder]
             ) -> tuple[Decoder, Tokenizer, np.ndarray, DictConfig, torch.device]:
    """What `sample_ids` and `stream_ids` take, for a branch's `load_model` and decoder
    (`make_decoder(model, prefix_len)`)."""
    device = device_for(cfg.device)
    model, tokenizer = load(ckpt, device, bool(cfg.get("force", False)))
    prompt, prefix_len = id_prompt(tokenizer, cfg)
    return make_decoder(model, prefix_len), tokenizer, prompt, cfg, device


def _sampling(tokenizer: Tokenizer, prompt: np.ndarray, cfg: DictConfig, device: torch.device
              ) -> tuple[torch.Tensor, dict]:
    """The batch of prompts and `stream_tokens`' arguments that `mehldau-generate` asks for."""
    sp = tokenizer.special_tokens
    seconds = generate_seconds(cfg)
    torch.manual_seed(int(cfg.seed))
    batch = torch.as_tensor(prompt, device=device)[None].repeat(int(cfg.num_samples), 1)
    mask = tokenizer.next_token_mask()
    return batch, dict(
        max_new_tokens=cfg.max_tokens or int(200 * seconds), cfg=sampling_config(cfg),
        generator=torch.Generator(device=device).manual_seed(int(cfg.seed)), eos_id=sp["eos"],
        seconds_per_id=torch.as_tensor(tokenizer.seconds_per_id(), dtype=torch.float32,
                                       device=device),
        max_seconds=seconds,
        # The user asked for a duration: never end early, never emit structural tokens.
        banned_ids=(sp["pad"], sp["bos"], sp["eos"], *range(
            tokenizer.vocab_size - len(tokenizer.styles), tokenizer.vocab_size)),
        allowed_next=None if mask is None else torch.as_tensor(mask, device=device))


def stream_ids(decoder: Decoder, tokenizer: Tokenizer, prompt: np.ndarray, cfg: DictConfig,
               device: torch.device) -> Iterator[StreamedNote]:
    """The notes `sample_ids` would write (bar `max_note_seconds`), as they are sampled; the
    same seed samples the same ids."""
    batch, kw = _sampling(tokenizer, prompt, cfg, device)
    return stream_notes(stream_tokens(decoder, batch, **kw), tokenizer, batch.cpu().numpy())


def sample_ids(decoder: Decoder, tokenizer: Tokenizer, prompt: np.ndarray, cfg: DictConfig,
               device: torch.device) -> list[Path]:
    """`num_samples` continuations of `prompt`, each `seconds` long, written as MIDI."""
    batch, kw = _sampling(tokenizer, prompt, cfg, device)
    seqs = sample_tokens(decoder, batch, progress=True, **kw)
    capped = [cap_durations(tokenizer.decode(row.cpu().numpy()), cfg.get("max_note_seconds"))
              for row in seqs]
    return write_scores([s for s, _ in capped], cfg.out, [n for _, n in capped])


# --- held-out likelihood ----------------------------------------------------------------------
def score_files(model: torch.nn.Module, tokenizer: Tokenizer, files: list[tuple[str, Path]],
                windows: Callable[[np.ndarray, list[np.ndarray] | None], Dataset],
                device: torch.device | str = "cpu", style: str | None = None,
                frame: Callable[[np.ndarray, Tokenizer], np.ndarray] = add_bos_eos,
                batch_size: int = 8) -> list:
    """Each file's summed nats under the model, with the file's notes and seconds
    (`mehldau.evaluation.likelihood`'s policy). `windows(sequence, prefixes)`: the branch's
    strided dataset over one framed piece. Unreadable files are skipped with a line on
    stderr."""
    from mehldau.evaluation.likelihood import piece_size, score_pieces

    prefix = None
    if tokenizer.styles:
        if style is None:
            raise UserError("the model is style-conditioned: name the style to score with")
        prefix = [np.array([adapt.checked_style_id(tokenizer, style)])]
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
    return score_pieces(model, lambda seq: windows(seq, prefix), pieces, device, batch_size)

