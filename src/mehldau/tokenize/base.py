"""The one tokenizer interface every branch uses.

A tokenizer turns a `symusic.Score` into an array whose first axis is time and back. The
shape of one step differs by representation, and nothing downstream assumes 1-D ids:

- performance events (Music Transformer): `(T,)` int64 ids, `event_shape == ()`;
- compound tokens (Moonbeam): `(T, 6)` int64 attributes, `event_shape == (6,)`;
- piano rolls (diffusion): `(T, 88, C)` uint8 frames, `event_shape == (88, C)`.

Datasets crop and window along axis 0 only. A tokenizer is saved as JSON (its registered name,
its config and the library versions) beside every checkpoint, as MidiTok does, and
`config_hash()` keys the on-disk token cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import symusic

from mehldau.errors import UserError

_REGISTRY: dict[str, type[Tokenizer]] = {}


def register(cls: type[Tokenizer]) -> type[Tokenizer]:
    """Class decorator: make a tokenizer loadable by its `name` from saved JSON."""
    _REGISTRY[cls.name] = cls
    return cls


class Tokenizer(ABC):
    name: ClassVar[str]
    # Bump when the codec changes in a way the config does not show, to invalidate caches.
    codec_version: ClassVar[int] = 1
    # What one step of `encode` is called, for loss units ("nats/event").
    step_name: ClassVar[str] = "token"
    # True when a note's duration is encoded at its onset (so a prompt cut at a time keeps
    # the whole notes that start before it); False for note-on/note-off events.
    note_durations: ClassVar[bool] = False
    config: Any  # a dataclass instance

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct ids (for compound tokens: the flat output vocabulary)."""

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Named special ids, at least `pad`, `bos` and `eos` for id-based tokenizers."""

    @property
    def event_shape(self) -> tuple[int, ...]:
        """Shape of one time step of `encode`'s output, `()` for plain ids."""
        return ()

    @abstractmethod
    def encode(self, score: symusic.Score) -> np.ndarray:
        """Score (any time unit) -> array of shape `(T, *event_shape)`."""

    @abstractmethod
    def decode(self, tokens: np.ndarray) -> symusic.Score:
        """Array -> piano Score (program 0). Must never raise on garbage input."""

    def augment(self, tokens: np.ndarray, transpose: int = 0, stretch: float = 1.0) -> np.ndarray:
        """Transpose by semitones and stretch time on an encoded sequence (identity by default)."""
        if transpose == 0 and stretch == 1.0:
            return tokens
        raise NotImplementedError(f"{self.name} does not support augmentation")

    @property
    def styles(self) -> list[str]:
        """Style (pianist) names with an id each, by convention the last ids of the vocabulary."""
        return list(getattr(self.config, "styles", []) or [])

    def style_id(self, name: str) -> int:
        known = self.styles
        if not known:
            raise UserError("this model was trained without style conditioning; drop style=")
        if name not in known:
            raise UserError(f"unknown style '{name}'; known styles: {', '.join(known)}")
        return self.vocab_size - len(known) + known.index(name)

    def next_token_mask(self) -> np.ndarray | None:
        """For 1-D ids with a fixed grammar: (V, V) bool, row a = the ids that may follow id
        a, so a sampler never draws a sequence `decode` would have to repair; None = any."""
        return None

    def seconds_per_id(self) -> np.ndarray | None:
        """For 1-D ids: seconds of music each id advances (length `vocab_size`), else None.

        Lets a sampler stop after a requested duration without decoding as it goes.
        """
        return None

    def seconds_of(self, tokens: np.ndarray) -> float:
        """Seconds of music a 1-D id sequence covers (0 when ids carry no time)."""
        secs = self.seconds_per_id()
        if secs is None or np.asarray(tokens).ndim != 1:
            return 0.0
        ids = np.asarray(tokens, np.int64)
        return float(secs[ids[(ids >= 0) & (ids < len(secs))]].astype(np.float64).sum())

    def time_shift_ids(self, seconds: float) -> np.ndarray:
        """The fewest time-advancing ids that cover `seconds` (to the nearest grid step),
        longest first; empty for tokenizers whose ids carry no time, or for seconds <= 0."""
        secs = self.seconds_per_id()
        if secs is None or seconds <= 0:
            return np.zeros(0, np.int64)
        ids = np.flatnonzero(secs > 0)
        steps = np.round(secs[ids] / secs[ids].min()).astype(np.int64)  # whole grid steps
        left = int(round(seconds / float(secs[ids].min())))
        out = []
        for i in np.argsort(-steps):  # greedy is exact: a 1-step shift exists
            k, left = divmod(left, int(steps[i]))
            out += [int(ids[i])] * k
        return np.array(out, np.int64)

    def encode_note(self, tokens: np.ndarray) -> str | None:
        """What `encode` changed in a kept piece, worth a line in the data report (e.g. a piece
        split at long silences), or None."""
        return None

    def encode_file(self, path: str | Path) -> np.ndarray:
        return self.encode(symusic.Score(str(path)))

    def decode_to_file(self, tokens: np.ndarray, path: str | Path) -> None:
        """Decode and write a MIDI file atomically (temp file, then rename)."""
        from mehldau.io import atomic_write_midi

        atomic_write_midi(self.decode(tokens), path)

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        versions = {"symusic": symusic.__version__}
        try:  # recorded when installed (miditok 3.1 has no `__version__`); never required
            versions["miditok"] = version("miditok")
        except PackageNotFoundError:
            pass
        return {
            "tokenizer": self.name,
            "codec_version": self.codec_version,
            "config": dataclasses.asdict(self.config),
            "versions": versions,
        }

    def config_hash(self) -> str:
        d = {"tokenizer": self.name, "codec_version": self.codec_version,
             "config": dataclasses.asdict(self.config)}
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> Tokenizer:
        """Build from a plain config dict; subclasses with a dataclass config override nothing."""
        return cls(cls.config_class(**config))  # type: ignore[attr-defined, call-arg]

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Tokenizer) and self.name == other.name
                and dataclasses.asdict(self.config) == dataclasses.asdict(other.config))


def build_tokenizer(name: str, config: dict[str, Any] | None = None) -> Tokenizer:
    """Build a registered tokenizer by name (e.g. from a Hydra config)."""
    _import_builtin()
    if name not in _REGISTRY:
        raise UserError(f"unknown tokenizer '{name}'; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name].from_config_dict(dict(config or {}))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved with `Tokenizer.save`."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read tokenizer file {path}: {e}; re-save it from the run") from e
    return build_tokenizer(d["tokenizer"], d["config"])


def _import_builtin() -> None:
    # Registration happens on import; keep the list here so `load_tokenizer` finds them all.
    import mehldau.tokenize.compound  # noqa: F401
    from mehldau.tokenize import duration, note_list, performance, pianoroll  # noqa: F401
