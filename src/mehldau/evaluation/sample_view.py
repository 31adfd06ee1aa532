"""One generated file as a listener meets it: a piano roll, audio, and its note statistics.

Shared by the web page (`mehldau-app`), `mehldau-generate render=true` and `make demo`, so
the picture, the sound and the figures a user sees are the same wherever they come from.
Audio goes through FluidSynth, as the comparison report's does (`report.render`); where
FluidSynth or a General MIDI soundfont is missing, `INSTALL_AUDIO` says what to install.
"""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

import numpy as np

from mehldau.evaluation.features import notes_per_second, pitch_range, polyphony, read_notes
from mehldau.evaluation.report import SOUNDFONTS, _plt, render
from mehldau.io import atomic_file

INSTALL_AUDIO = ("no audio: needs the fluidsynth command and a General MIDI soundfont "
                 "(Debian/Ubuntu: sudo apt-get install fluidsynth fluid-soundfont-gm; macOS: "
                 "brew install fluid-synth and soundfont=FILE.sf2); the MIDI is still here")


def find_soundfont(given: str | Path | None = None) -> Path | None:
    """`given` if it is a file, else the first installed Debian General MIDI soundfont."""
    for cand in ([given] if given else SOUNDFONTS):
        if cand and Path(str(cand)).expanduser().is_file():
            return Path(str(cand)).expanduser()
    return None


def audio_available(font: str | Path | None = None) -> bool:
    return shutil.which("fluidsynth") is not None and find_soundfont(font) is not None


def render_wav(midi: str | Path, wav: str | Path, font: str | Path | None = None,
               seconds: float | None = None) -> bool:
    """MIDI -> 44.1 kHz WAV, written whole or not at all; False when audio is unavailable or
    FluidSynth fails (the caller shows `INSTALL_AUDIO` or the MIDI alone). `seconds`: the
    length the listener asked for; the render is cut there (a 30 ms fade, no click) or padded
    with silence, so a model that stops early is heard stopping early, not as a short file."""
    sf = find_soundfont(font)
    if sf is None or shutil.which("fluidsynth") is None:
        return False
    return render(midi, Path(wav), sf, seconds)


def wav_seconds(path: str | Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / float(w.getframerate())


def wav_level_dbfs(path: str | Path) -> float:
    """RMS level of a 16-bit WAV in dB below full scale (how loud the render is)."""
    with wave.open(str(path)) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float64)
    rms = float(np.sqrt(np.mean(x ** 2))) if len(x) else 0.0
    return 20 * np.log10(max(rms, 1e-9) / 32768.0)


def piano_roll_png(midi: str | Path, png: str | Path, prompt_seconds: float = 0.0,
                   title: str = "") -> None:
    """One file as a piano roll, the prompt (notes starting before `prompt_seconds`) in grey
    and what was generated in colour, velocity as opacity."""
    plt = _plt()
    n = read_notes(midi)
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for on, end, pitch, vel in zip(n.onset, n.end, n.pitch, n.velocity):
        colour = "0.55" if on < prompt_seconds else "C0"
        ax.add_patch(plt.Rectangle((on, pitch - 0.4), max(end - on, 0.02), 0.8, color=colour,
                                   alpha=0.35 + 0.65 * min(int(vel), 127) / 127))
    if prompt_seconds > 0:
        ax.axvline(prompt_seconds, color="0.3", lw=0.8, ls="--")
    ax.set_xlim(0, max(float(n.end.max(initial=0.0)), prompt_seconds, 1.0))
    lo, hi = (int(n.pitch.min()), int(n.pitch.max())) if len(n) else (48, 84)
    ax.set_ylim(max(lo - 3, 20), min(hi + 3, 109))
    ax.set_xlabel("seconds" + (" (grey: the prompt)" if prompt_seconds > 0 else ""))
    ax.set_ylabel("MIDI pitch")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_file(png, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    plt.close(fig)


STAT_NAMES = {"notes_per_second": "notes/s", "polyphony": "polyphony",
              "median_length": "median length (s)", "pitch_range": "pitch range (semitones)",
              "lowest": "lowest pitch", "highest": "highest pitch"}


def note_stats(midi: str | Path, start: float = 0.0, seconds: float | None = None
               ) -> dict[str, float]:
    """The figures shown beside each sample, on the span after `start` (the continuation):
    notes per second, mean polyphony where anything sounds (10 ms frames), median note
    length with the pedal folded in, pitch range and its ends."""
    n = read_notes(midi, start, seconds)
    return {
        "notes_per_second": float(notes_per_second(n)[0]),
        "polyphony": float(polyphony(n)[0]),
        "median_length": float(np.median(n.end - n.onset)) if len(n) else 0.0,
        "pitch_range": float(pitch_range(n)[0]),
        "lowest": float(n.pitch.min()) if len(n) else float("nan"),
        "highest": float(n.pitch.max()) if len(n) else float("nan"),
    }


def stats_table(sample: dict[str, float], reference: dict[str, float] | None,
                reference_name: str = "reference") -> str:
    """A markdown table of a sample's statistics next to the reference's."""
    head = f"| | sample | {reference_name} |\n|---|---|---|" if reference else \
        "| | sample |\n|---|---|"
    rows = []
    for key, label in STAT_NAMES.items():
        v = f"{sample[key]:.2f}" if key in sample else "n/a"
        rows.append(f"| {label} | {v} |" + (f" {reference[key]:.2f} |" if reference else ""))
    return "\n".join([head, *rows])
