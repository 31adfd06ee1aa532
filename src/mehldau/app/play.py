"""The Play tab's work, without the page: settings -> the `mehldau-generate` overrides that
reproduce them, one generation per model at a time, and each sample drawn, rendered and
measured.

The page runs exactly what the command line runs (the composed `generate` config handed to
the branch recipe's `generate`), so the command it shows writes the same MIDI bytes.
"""

from __future__ import annotations

import shlex
import shutil
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from mehldau.app.runs import RunInfo
from mehldau.data.corpus import BadMidi, read_score
from mehldau.errors import UserError
from mehldau.evaluation import sample_view as view

MIDI_MAGIC = b"MThd"
RULES = ("pitch_histogram", "note_density", "chord")


@dataclass
class Settings:
    """What the page's controls say; the branch's recipe decides which of them it reads."""

    seconds: float = 10.0
    prompt_seconds: float = 5.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    num_samples: int = 1
    style: str | None = None
    # scg_diffusion: Stochastic Control Guidance toward a reference excerpt's rule features
    rule_offset: float = 0.0
    rule_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # in the order of RULES
    candidates: int = 8
    steps: int = 20  # configs/generate.yaml sampler.steps (docs/scg_sampling_speed.md)


def overrides(run: RunInfo, s: Settings, out: Path, prompt: Path | None = None,
              reference: Path | None = None, device: str = "cpu") -> list[str]:
    """`mehldau-generate` key=value arguments for these settings, only the ones `run`'s branch
    reads (a setting it would ignore is refused by mehldau-generate)."""
    args = [f"ckpt={run.ckpt}", f"out={out}", f"seconds={s.seconds:g}", f"seed={int(s.seed)}",
            f"num_samples={int(s.num_samples)}", f"device={device}"]
    if prompt is not None:
        args += [f"prompt={prompt}", f"prompt_seconds={s.prompt_seconds:g}"]
    if run.branch == "scg_diffusion":
        args += [f"sampler.steps={int(s.steps)}"]
        if reference is not None:
            args += [f"rules.reference={reference}", f"rules.offset={s.rule_offset:g}",
                     f"scg.candidates={int(s.candidates)}"]
            args += [f"rules.weights.{r}={w:g}" for r, w in zip(RULES, s.rule_weights)]
    else:
        args += [f"temperature={s.temperature:g}", f"top_k={int(s.top_k)}",
                 f"top_p={s.top_p:g}"]
        if s.style and run.styles:
            args += [f"style={s.style}"]
    return args


def _hydra(arg: str) -> str:
    """key=value with the value quoted for Hydra's override grammar when it needs it (a path
    with a space, a style name)."""
    key, _, value = arg.partition("=")
    if any(c in value for c in " ,=[]{}'\"()"):
        value = "'" + value.replace("'", "\\'") + "'"
    return f"{key}={value}"


def hydra_args(args: list[str]) -> list[str]:
    return [_hydra(a) for a in args]


def command_line(args: list[str]) -> str:
    """The terminal command for `args`, quoted for a POSIX shell and for Hydra."""
    def shell(a: str) -> str:
        plain = not any(c in a for c in '"$`\\!')
        return f'"{a}"' if plain and a != shlex.quote(a) else shlex.quote(a)
    return "mehldau-generate " + " ".join(shell(_hydra(a)) for a in args)


def check_upload(path: str | Path | None, max_bytes: int) -> Path | None:
    """An uploaded prompt: None when nothing was uploaded; a one-line refusal when it is
    empty, too large, not a Standard MIDI File, or holds no notes."""
    if path is None or str(path) == "":
        return None
    path = Path(path)
    size = path.stat().st_size if path.is_file() else 0
    if size == 0:
        raise UserError("the uploaded file is empty; upload a .mid file with notes")
    if size > max_bytes:
        raise UserError(f"the uploaded file is {size / 1e6:.1f} MB, over the "
                        f"{max_bytes / 1e6:.1f} MB limit (app.max_upload_mb); upload a shorter "
                        "MIDI file")
    with open(path, "rb") as f:
        if f.read(4) != MIDI_MAGIC:
            raise UserError(f"'{path.name}' is not a MIDI file (no MThd header); upload a .mid")
    try:
        score = read_score(path)
    except BadMidi as e:
        raise UserError(f"'{path.name}' cannot be read as MIDI: {e}; upload another file") from e
    if score.note_num() == 0:
        raise UserError(f"'{path.name}' has no notes; upload a MIDI file with piano notes")
    return path


class ModelQueue:
    """One lock per checkpoint: two requests for one model wait their turn (a model in memory
    samples one batch at a time), requests for different models run side by side."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    def lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks[key]


def generate(run: RunInfo, args: list[str]) -> list[Path]:
    """Run what `mehldau-generate <args>` runs, in this process; the written MIDI files."""
    from mehldau.cli.common import compose
    from mehldau.generation import check_settings
    from mehldau.train.checkpoint import branch_recipe, read_meta

    cfg = compose("generate", hydra_args(args))
    recipe = branch_recipe(run.ckpt, read_meta(run.ckpt))
    check_settings(cfg, compose("generate", []), str(run.branch), recipe.GENERATE_SETTINGS)
    # scg_diffusion also writes each sample's rule targets as JSON beside it
    return [p for p in recipe.generate(cfg, run.ckpt) if p.suffix.lower() in (".mid", ".midi")]


@dataclass
class Sample:
    midi: Path
    png: Path
    wav: Path | None  # None: no FluidSynth or soundfont here
    stats: dict[str, float]


def present(midi: Path, start: float, seconds: float, font: str | None) -> Sample:
    """Draw, render and measure one written sample (its continuation after `start`)."""
    png = midi.with_suffix(".png")
    view.piano_roll_png(midi, png, start, title=midi.name)
    wav = midi.with_suffix(".wav")
    if not view.render_wav(midi, wav, font, seconds=start + seconds):
        wav = None
    return Sample(midi, png, wav, view.note_stats(midi, start, seconds))


def reference_stats(files: list[Path], start: float, seconds: float) -> dict[str, float]:
    """The statistics of the music a sample is set against, averaged over `files`."""
    rows = [view.note_stats(f, start, seconds) for f in files]
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


def fresh_dir(root: Path, prefix: str) -> Path:
    import tempfile

    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def copy_prompt(src: Path, dst_dir: Path, name: str = "prompt.mid") -> Path:
    dst = dst_dir / name
    shutil.copyfile(src, dst)
    return dst
