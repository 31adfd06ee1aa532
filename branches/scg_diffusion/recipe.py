"""The scg_diffusion branch: a piano-roll VQ-VAE, a latent DiT, and Stochastic Control
Guidance toward rules that have no gradient (Huang et al., ICML 2024, arXiv 2402.14285).

Composed from the core: the pianoroll tokenizer, roll datasets (`mehldau.data.rolls`), the
autoencoder (`mehldau.nn.vqvae`), latent diffusion (`mehldau.nn.latent_diffusion`: DiT + DDPM),
the rules (`mehldau.guidance.rules`), SCG (`mehldau.guidance.stochastic_control_guidance`) and
the shared trainer. Two stages, each a plain training run with its own run directory:

    mehldau-train branch=scg_diffusion stage=autoencoder run_dir=runs/ae
    mehldau-train branch=scg_diffusion stage=diffusion init=runs/ae run_dir=runs/dit

The diffusion checkpoint holds the frozen autoencoder too, so `mehldau-generate ckpt=runs/dit`
needs nothing else. Generation draws every sample twice from the same seed, with and without
guidance, and writes the rule losses of both beside the MIDI, so the effect of SCG is measured
on each output rather than claimed.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import symusic
import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from mehldau.data.corpus import BadMidi, read_score
from mehldau.data.dataset import Augmentation
from mehldau.data.rolls import (
    FixedNoiseLatents,
    LatentCropDataset,
    RollCropDataset,
    RollWindowDataset,
    count_frames,
    count_latent_rows,
    encode_rolls,
)
from mehldau.errors import UserError
from mehldau.generation import device_for, generate_seconds, write_scores
from mehldau.guidance.rules import (
    RULES,
    chord_mismatch,
    chord_scores,
    rule_losses,
    rule_scales,
    targets_from_json,
    targets_from_midi,
    targets_to_json,
    weighted_loss,
)
from mehldau.guidance.stochastic_control_guidance import SCGConfig, scg_sample
from mehldau.io import atomic_file, atomic_write_midi
from mehldau.nn.diffusion import Solver, sample
from mehldau.nn.latent_diffusion import LatentDiffusion, LatentDiffusionConfig, stitch
from mehldau.nn.vqvae import VQVAE, VQVAEConfig, reconstruction_report
from mehldau.recipes.run import (
    checkpoint_extras,
    fit_logged,
    made_up_score,
    metrics_file,
    plan_memory,
    run_corpus,
    run_dir_for,
    run_pieces,
    train_config,
)
from mehldau.tokenize.base import Tokenizer, build_tokenizer, load_tokenizer
from mehldau.tokenize.notes import PIANO_PROGRAMS, cut_prompt
from mehldau.tokenize.pianoroll import roll_to_tensor, tensor_to_roll
from mehldau.train.checkpoint import (
    load_weights,
    read_meta,
    resolve_checkpoint,
)
from mehldau.train.trainer import make_accelerator

BRANCH = "scg_diffusion"
STAGES = ("autoencoder", "diffusion")
# Roll repairs at decode (`pianoroll.clean_rolls`), with their types.
# The mehldau-generate settings generate reads; any other one set is refused (no sampling
# temperature or top-k/p: a diffusion step has no token distribution to reshape).
GENERATE_SETTINGS = frozenset({"prompt", "prompt_seconds", "seconds", "seed", "num_samples",
                               "device", "rules", "scg", "sampler", "decode"})
_REPAIRS = {"max_gap_frames": int, "restrike_frames": int, "min_note_frames": int,
            "min_note_peak": float}


# --- configs ---------------------------------------------------------------------------------
def autoencoder_config(cfg: DictConfig) -> VQVAEConfig:
    try:
        return VQVAEConfig(**OmegaConf.to_container(cfg.model.autoencoder, resolve=True))
    except (TypeError, ValueError) as e:
        raise UserError(f"bad model.autoencoder: {e}") from e


def diffusion_config(cfg: DictConfig, autoencoder: VQVAEConfig) -> LatentDiffusionConfig:
    m = cfg.model
    try:
        return LatentDiffusionConfig(
            autoencoder=autoencoder.to_dict(),
            dit=OmegaConf.to_container(m.dit, resolve=True), frames=int(m.frames),
            schedule=str(m.get("schedule", "linear")),
            diffusion_steps=int(m.get("diffusion_steps", 1000)),
            velocity_floor=float(m.get("velocity_floor", 0.08)),
            **{k: kind(m[k]) for k, kind in _REPAIRS.items() if m.get(k) is not None})
    except (TypeError, ValueError) as e:
        raise UserError(f"bad model config: {e}") from e


def _tokenizer(cfg: DictConfig) -> Tokenizer:
    return build_tokenizer(cfg.branch.tokenizer.name,
                           OmegaConf.to_container(cfg.branch.tokenizer.config, resolve=True))


# --- training --------------------------------------------------------------------------------
def train(cfg: DictConfig) -> Path:
    stage = str(cfg.stage)
    if stage not in STAGES:
        raise UserError(f"scg_diffusion trains in two stages, not stage={stage}: first "
                        "stage=autoencoder, then stage=diffusion init=<the autoencoder run>")
    if cfg.style.enabled:
        raise UserError("scg_diffusion has no style conditioning; drop style.enabled")
    tcfg = train_config(cfg, stage)
    augment = Augmentation.from_config(cfg.augment)
    accelerator = make_accelerator(tcfg.mixed_precision)
    run_dir = run_dir_for(cfg, f"{BRANCH}/{stage}-", tcfg.resume)
    accelerator.wait_for_everyone()  # every process checked the run dir before any writes
    if stage == "autoencoder":
        if cfg.init is not None:
            raise UserError("stage=autoencoder trains from scratch; drop init= (init= is for "
                            "stage=diffusion: the autoencoder run to build on)")
        tokenizer, ae_cfg, base = _tokenizer(cfg), autoencoder_config(cfg), None
        frames = int(cfg.model.autoencoder_frames)
        if frames % ae_cfg.time_factor:
            raise UserError(f"model.autoencoder_frames={frames} must be a multiple of the "
                            f"autoencoder's time factor {ae_cfg.time_factor}")
    else:
        base, tokenizer, ae_cfg = _autoencoder_run(cfg)
        dcfg = diffusion_config(cfg, ae_cfg)  # validated before anything is written
        frames = dcfg.frames

    # The model and the memory plan come before any data is read: a setting that cannot fit
    # is refused before the corpus is tokenized. The probe trains on made-up items.
    set_seed(cfg.seed)
    if stage == "autoencoder":
        model: torch.nn.Module = VQVAE(ae_cfg)
        made_up = tokenizer.encode(made_up_score(frames // 4 + 8))  # >= 6 frames a note
        items = RollCropDataset([made_up], frames, tokenizer, cfg.seed, augment)
        model_dict, count = ae_cfg.to_dict(), count_frames
    else:
        ae = VQVAE(ae_cfg)
        model = LatentDiffusion(dcfg)  # reads dcfg.latent_scale, set once the data is encoded
        items = [{"z": torch.zeros(dcfg.latent_shape())}] * tcfg.batch_size
        count = count_latent_rows
    tcfg = plan_memory(tcfg, accelerator, model, items)

    # The diffusion stage keeps its autoencoder's splits unless told otherwise, and records
    # the autoencoder as its ancestor (lineage.json): a latent model must not be validated
    # on pieces its autoencoder learned to reconstruct.
    corpus = run_corpus(cfg, run_pieces(cfg), tokenizer, run_dir, base, tcfg.resume,
                        accelerator)
    rolls = {s: corpus.sequences(s) for s in corpus.splits}
    all_rolls = [r for s in corpus.splits for r in corpus.sequences(s)]
    metrics, _ = metrics_file(run_dir, tcfg.resume, {
        "frames": int(sum(map(len, all_rolls))), "pieces": len(all_rolls),
        "skipped": len(corpus.skipped)}, accelerator.is_main_process)
    val_windows = RollWindowDataset(rolls["val"], frames) if rolls["val"] else None
    if val_windows is not None and len(val_windows) == 0:
        val_windows = None
    if val_windows is None:
        print("train: no val piece as long as a window (see split.seed, split.ratios); no "
              "val loss", file=sys.stderr)
    if stage == "autoencoder":
        try:
            train_ds = RollCropDataset(rolls["train"], frames, tokenizer, cfg.seed, augment)
        except ValueError as e:
            raise UserError(f"the training split has no notes ({e}); use more files") from e
        val_ds = val_windows
    else:
        load_weights(ae, base, BRANCH)
        shift = cfg.model.get("latent_transpose")
        train_ds, val_ds = _encoded_datasets(ae.to(accelerator.device).eval(), dcfg, rolls,
                                             val_windows, tokenizer,
                                             augment.transpose if shift is None else int(shift),
                                             cfg.seed)
        model.autoencoder.load_state_dict(ae.state_dict())
        model_dict = dcfg.to_dict()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: {BRANCH} {stage}, {n / 1e6:.2f}M trainable parameters", file=sys.stderr)

    write_extra = checkpoint_extras(cfg, tokenizer, model_dict, run_dir)
    meta = {"branch": BRANCH, "recipe": __name__, "model": type(model).__name__,
            "stage": stage}
    if base is not None:
        meta["autoencoder"] = str(base.resolve())
    last = fit_logged(cfg, tcfg, run_dir, model, train_ds, val_ds, meta, write_extra,
                      accelerator, "(reconstruction BCE + commitment)"
                      if stage == "autoencoder" else "(noise MSE)", count=count)
    if stage == "autoencoder" and val_ds is not None and accelerator.is_main_process:
        report = reconstruction_report(accelerator.unwrap_model(model), val_ds,
                                       tcfg.eval_batch_size)
        metrics.write({"step": int(last.get("step", tcfg.max_steps)), "split": "val",
                       **report})
        print(f"autoencoder on val: note F1 {report['note_f1']:.3f} (onsets within one "
              f"frame), codebook usage {report['codebook_usage']:.2f}", file=sys.stderr)
    return run_dir


def _autoencoder_run(cfg: DictConfig) -> tuple[Path, Tokenizer, VQVAEConfig]:
    if cfg.init is None:
        raise UserError("stage=diffusion needs init=<the stage=autoencoder run or checkpoint>")
    base = resolve_checkpoint(cfg.init)
    meta = read_meta(base)
    if meta.get("branch") != BRANCH or meta.get("stage") != "autoencoder":
        raise UserError(f"init {base} is a '{meta.get('branch')}' {meta.get('stage')} "
                        "checkpoint; stage=diffusion needs an scg_diffusion autoencoder run")
    tokenizer = load_tokenizer(base / "tokenizer.json")
    if _tokenizer(cfg) != tokenizer:
        raise UserError(f"branch.tokenizer differs from the tokenizer of init {base}; the "
                        "diffusion stage uses the autoencoder's, so drop the override")
    ae_cfg = VQVAEConfig(**json.loads((base / "model_config.json").read_text()))
    return base, tokenizer, ae_cfg


def _encoded_datasets(ae: VQVAE, dcfg: LatentDiffusionConfig, rolls: dict,
                      val_windows: RollWindowDataset | None, tokenizer: Tokenizer,
                      transpose: int, seed: int):
    """Encode the training pieces once per transposition in [-transpose, transpose] (time
    stretch is not applied in this stage) and the validation windows once; set latent_scale
    from the training latents' std."""
    device = next(ae.parameters()).device
    t0 = time.perf_counter()
    shifts = list(range(-transpose, transpose + 1))
    latents = encode_rolls(ae.encode, rolls["train"], dcfg.frames, ae.config.time_factor,
                           shifts, tokenizer, device=device)
    std = float(torch.cat([z.flatten() for z, _ in latents]).std())
    if not std > 0:
        raise UserError("the autoencoder maps every training roll to one latent; train "
                        "stage=autoencoder longer or check the data")
    dcfg.latent_scale = 1.0 / std
    latents = [(z * dcfg.latent_scale, a) for z, a in latents]
    try:
        train_ds = LatentCropDataset(latents, dcfg.latent_shape()[1], seed)
    except ValueError as e:
        raise UserError(f"the training split has no notes ({e}); use more files") from e
    val_ds = None
    if val_windows is not None:
        with torch.no_grad():
            z = torch.cat([ae.encode(torch.stack([val_windows[j]["x"] for j in range(
                i, min(i + 16, len(val_windows)))]).to(device)).float().cpu()
                for i in range(0, len(val_windows), 16)])
        val_ds = FixedNoiseLatents(z * dcfg.latent_scale, dcfg.diffusion_steps, seed)
    rows = sum(z.shape[1] for z, _ in latents)
    print(f"encoded {len(latents)} training rolls ({len(shifts)} transpositions, {rows:,} "
          f"latent rows) in {time.perf_counter() - t0:.1f} s; latent {dcfg.latent_shape()} per "
          f"{dcfg.frames / tokenizer.config.fps:.2f} s, scale {dcfg.latent_scale:.4f}",
          file=sys.stderr)
    return train_ds, val_ds


# --- generation ------------------------------------------------------------------------------
def load_model(ckpt: Path, device: torch.device | str = "cpu"
               ) -> tuple[LatentDiffusion, Tokenizer]:
    meta = read_meta(ckpt)
    if meta.get("stage") != "diffusion":
        raise UserError(f"checkpoint {ckpt} is the {meta.get('stage')} stage; generate from "
                        "a stage=diffusion run (train it with init=<this run>)")
    try:
        dcfg = LatentDiffusionConfig(**json.loads((ckpt / "model_config.json").read_text()))
    except (OSError, TypeError, ValueError) as e:
        raise UserError(f"{ckpt / 'model_config.json'} is missing or damaged ({e})") from e
    model = LatentDiffusion(dcfg)
    load_weights(model, ckpt, BRANCH)
    return model.to(device).eval(), load_tokenizer(ckpt / "tokenizer.json")


def _rows(seconds: float, fps: int, time_factor: int) -> int:
    """Latent rows that cover `seconds` (a row is `time_factor` frames)."""
    return -(-round(seconds * fps) // time_factor)


def _prompt(cfg: DictConfig, model: LatentDiffusion, tokenizer: Tokenizer, batch: int
            ) -> tuple[symusic.Score | None, torch.Tensor]:
    """The prompt cut as every branch cuts it (`cut_prompt`), and the latents (B, C, h, P)
    of its rows that lie wholly inside its first `prompt_seconds` (a row the cut falls in is
    sampled); no prompt: no rows."""
    dcfg, device = model.config, next(model.parameters()).device
    tf = VQVAEConfig(**dcfg.autoencoder).time_factor
    if cfg.prompt is None:
        c, _, p = dcfg.latent_shape()
        return None, torch.zeros(batch, c, 0, p, device=device)
    seconds, fps = float(cfg.prompt_seconds), tokenizer.config.fps
    held = int(round(seconds * fps, 6)) // tf
    if held == 0:
        raise UserError(f"prompt_seconds={seconds:g} is shorter than one latent row "
                        f"({tf / fps:g} s); raise it")
    try:
        cut = cut_prompt(read_score(cfg.prompt), seconds)
    except BadMidi as e:
        raise UserError(f"prompt {cfg.prompt}: {e}; pass a MIDI file with notes") from e
    roll = tokenizer.encode(cut)  # notes whole: what sounds past the cut is the prompt's too
    if not roll.any():
        raise UserError(f"prompt {cfg.prompt} has no piano notes in its first {seconds:g} s; "
                        "raise prompt_seconds or use another file")
    frames = max(-(-len(roll) // tf) * tf, held * tf)
    roll = np.pad(roll, ((0, frames - len(roll)), (0, 0), (0, 0)))
    z = model.encode(roll_to_tensor(roll)[None].to(device))[:, :, :held]
    return cut, z.float().expand(batch, -1, -1, -1).contiguous()


def _continued(cut: symusic.Score, continuation: symusic.Score, seconds: float
               ) -> symusic.Score:
    """The prompt as cut (its notes whole, its controllers), then the continuation's notes
    that start at or after the cut; the decoded rows over the prompt are its reconstruction,
    not music of the model's, and are dropped."""
    out = cut.copy()  # in seconds, as cut_prompt returns it
    notes = [n for t in continuation.to("second").tracks for n in t.notes if n.time >= seconds]
    piano = [t for t in out.tracks if not t.is_drum and t.program in PIANO_PROGRAMS
             and len(t.notes)]
    if piano:
        track = piano[0]
    else:
        track = symusic.Track("continuation", 0, False, ttype="second")
        out.tracks.append(track)
    track.notes.extend(notes)
    track.notes.sort()
    return out.to("tick")


def _rule_names(cfg: DictConfig) -> list[str]:
    use = cfg.rules.get("use")
    names = list(RULES) if use is None else [str(u) for u in use]
    unknown = [n for n in names if n not in RULES]
    if unknown or not names:
        raise UserError(f"unknown rule '{unknown[0] if unknown else ''}' in rules.use; "
                        f"choose from {', '.join(RULES)}")
    return names


def _targets(cfg: DictConfig, tokenizer: Tokenizer, names: list[str], frames: int
             ) -> dict[str, torch.Tensor] | None:
    """The rule targets of a window of `frames` (every window of a stitched piece is guided
    toward the same ones: a reference shorter than the piece would otherwise run out)."""
    r = cfg.rules
    fps = tokenizer.config.fps
    if r.get("reference") is not None and r.get("targets") is not None:
        raise UserError("give rules.reference or rules.targets, not both")
    if r.get("reference") is not None:
        path = Path(str(r.reference)).expanduser()
        if not path.is_file():
            raise UserError(f"rules.reference not found: {path}")
        try:
            read_score(path)
        except BadMidi as e:
            raise UserError(f"rules.reference {path}: {e}; pass a MIDI file with notes") from e
        if float(r.offset) < 0:
            raise UserError(f"rules.offset must be >= 0, got {r.offset}")
        offset = float(r.offset)
        targets = targets_from_midi(path, tokenizer, frames / fps, names, offset)
        if float(targets["pitch_histogram"].sum() if "pitch_histogram" in targets else 1) == 0:
            raise UserError(f"rules.reference {path} is silent from {offset:g} s for "
                            f"{frames / fps:g} s; choose another rules.offset")
        return targets
    if r.get("targets") is not None:
        return targets_from_json(r.targets, names, frames, window=128)
    return None


def generate(cfg: DictConfig, ckpt: Path) -> list[Path]:
    """`num_samples` pieces: the prompt (if any) continued for `seconds`, window by window
    (`stitch`); drawn twice from one seed, without and with guidance, when rules are given."""
    device = device_for(cfg.device)
    model, tokenizer = load_model(ckpt, device)
    dcfg = model.config
    for key, kind in _REPAIRS.items():  # decode.<key>=N overrides the checkpoint's repairs
        if (cfg.get("decode") or {}).get(key) is not None:
            setattr(dcfg, key, kind(cfg.decode[key]))
    try:
        LatentDiffusionConfig(**dcfg.to_dict())
    except ValueError as e:
        raise UserError(f"bad decode option: {e}") from e
    fps, B = tokenizer.config.fps, int(cfg.num_samples)
    tf = VQVAEConfig(**dcfg.autoencoder).time_factor
    names = _rule_names(cfg)
    weights = {k: float(v) for k, v in (cfg.rules.get("weights") or {}).items()}
    solver_name, eta = str(cfg.sampler.get("name") or "ddim"), float(cfg.sampler.eta)
    spacing = str(cfg.sampler.get("spacing") or "uniform")
    try:
        stochastic = Solver(model.schedule, solver_name, eta, spacing).stochastic
        # SCG chooses among a step's random draws: a deterministic sampler can only go unguided
        guiding = any(cfg.rules.get(k) is not None for k in ("reference", "targets"))
        scg = (SCGConfig(candidates=int(cfg.scg.candidates), t_start=int(cfg.scg.t_start),
                         t_end=int(cfg.scg.t_end), every=int(cfg.scg.every), eta=eta,
                         solver=solver_name, spacing=spacing)
               if stochastic or guiding else None)
    except ValueError as e:
        raise UserError(f"bad scg/sampler option: {e}") from e
    steps = int(cfg.sampler.steps)
    if not 1 <= steps <= dcfg.diffusion_steps:
        raise UserError(f"sampler.steps must be in 1..{dcfg.diffusion_steps}, got {steps}")
    normalize = str(cfg.rules.get("normalize", "unguided"))
    if normalize not in ("unguided", "candidates", "none"):
        raise UserError(f"rules.normalize must be unguided, candidates or none, got "
                        f"'{normalize}'")
    seconds = generate_seconds(cfg, default=dcfg.frames / fps)
    cut, known = _prompt(cfg, model, tokenizer, B)
    ps = float(cfg.prompt_seconds) if cut is not None else 0.0
    window = dcfg.latent_shape()[1]
    # A window holds at most half of itself from what precedes it: the rest is new music.
    plan = dict(known=known, rows=_rows(ps + seconds, fps, tf), window=window,
                context=window // 2, multiple=int(dcfg.dit["patch_size"][0]))
    targets_at = functools.lru_cache(lambda frames: _targets(cfg, tokenizer, names, frames))

    def losses(rolls: torch.Tensor) -> dict[str, torch.Tensor]:
        return rule_losses(rolls, targets_at(rolls.size(2)), names, fps=fps)

    def window(loss_fn, gen: torch.Generator, inpaint) -> torch.Tensor:
        if loss_fn is None:  # scg_sample(None)'s draws, also for dpmpp_2m (SCGConfig refuses it)
            return sample(model.dit, Solver(model.schedule, solver_name, eta, spacing),
                          inpaint.known.shape, steps, gen, device=device, inpaint=inpaint)
        return scg_sample(model.dit, model.decode, loss_fn, model.schedule,
                          inpaint.known.shape, steps, scg, gen, device=device, inpaint=inpaint)

    def draw(loss_fn) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
        z, windows = stitch(lambda inpaint, _: window(loss_fn, gen, inpaint), **plan)
        return model.decode(z).float().clamp(0, 1), windows

    with torch.no_grad():
        unguided, windows = draw(None)  # the same seed: what guidance is measured against
        start, w = windows[0]  # the rule report is over the first window
        first = slice(start * tf, (start + w) * tf)
        targets = targets_at(w * tf)
        if targets is None:
            guided = unguided
        else:
            u_loss = losses(unguided[:, :, first])
            scales = rule_scales(u_loss) if normalize == "unguided" else None
            groups = B if normalize == "candidates" else None
            guided, _ = draw(lambda rolls: weighted_loss(losses(rolls), weights, scales,
                                                         groups))

    def scores(rolls: torch.Tensor) -> list[symusic.Score]:
        decoded = [tokenizer.decode(r) for r in tensor_to_roll(rolls.cpu())]
        return decoded if cut is None else [_continued(cut, d, ps) for d in decoded]

    paths = write_scores(scores(guided), cfg.out)
    if targets is None:
        print("no rules.reference or rules.targets: sampled without guidance", file=sys.stderr)
        return paths
    g_loss = losses(guided[:, :, first])
    mismatch = None
    if "chord" in names:  # the reference's 0-1 chord loss, beside our graded one
        mismatch = {k: chord_mismatch(chord_scores(r[:, :, first], fps=fps), targets["chord"])
                    for k, r in (("guided", guided), ("unguided", unguided))}
    extra = [p.with_suffix(".unguided.mid") for p in paths]
    for score, path in zip(scores(unguided), extra):
        atomic_write_midi(score, path)
    reports = []
    for b, path in enumerate(paths):
        report = {
            "targets": targets_to_json(targets),
            "guided": {k: float(v[b]) for k, v in g_loss.items()},
            "unguided": {k: float(v[b]) for k, v in u_loss.items()},
            "weights": {k: weights.get(k, 1.0) for k in names},
            "scales": scales,  # each rule's loss was divided by this (unguided mean)
            "unguided_midi": str(extra[b]), "seed": int(cfg.seed),
            "normalize": normalize,
            "scg": scg.to_dict(), "sampler_steps": steps, "sampler": solver_name,
            "sampler_spacing": spacing,
            # the losses above are over the first window: these seconds of the output
            "scored_seconds": [start * tf / fps, (start + w) * tf / fps],
            "windows": len(windows),
            "reference": None if cfg.rules.get("reference") is None
            else {"path": str(cfg.rules.reference), "offset": float(cfg.rules.offset)},
        }
        if mismatch is not None:
            report["chord_mismatch"] = {k: float(v[b]) for k, v in mismatch.items()}
        out = path.with_suffix(".json")
        with atomic_file(out) as f:
            json.dump(report, f, indent=2)
        reports.append(out)
        summary = ", ".join(f"{k} {report['guided'][k]:.4f} vs {report['unguided'][k]:.4f}"
                            for k in names)
        print(f"{out}: guided vs unguided rule loss: {summary}", file=sys.stderr)
    return [*paths, *extra, *reports]


def merge_checkpoint(cfg: DictConfig, ckpt: Path) -> Path:
    raise UserError("scg_diffusion checkpoints have no adapter to merge; use them as they are")

