"""Moonbeam (Guo & Dixon 2025, arXiv 2505.15559): a MIDI foundation model over compound
tokens (onset, duration, octave, pitch class, instrument, velocity), weights-compatible with
the released `moonbeam_309M.pt` / `moonbeam_839M.pt` checkpoints.

Pieces, following `docs/moonbeam.md` (section numbers below refer to it):
- Fundamental Music Embedding (FME) per numeric attribute, a word embedding for the
  instrument, concatenated (not summed) and passed through a supplementary MLP (§3.2);
- Multidimensional Relative Attention (MRA): a LLaMA backbone with no sequence-index
  position at all; the 12 query heads form 6 groups (with GQA, one KV head each) and each
  group is rotated by one attribute of the token with its own RoPE base (§3.3);
- a GRU sub-decoder that emits the 6 attributes of the next token one after another over
  a flat vocabulary, teacher-forced in training (§3.5).

Hand-written rather than imported because the public code runs only through a vendored fork
of transformers 4.42; parameter names and shapes are kept exactly those of the released
state_dict so `load_released` can load it with `strict=True`.

Numerics of the angles (§3.7), `MoonbeamConfig.reference_numerics`. The reference runs in
bf16 after `model.to(bfloat16)`: its FME casts the integer input to bf16 (onsets above 256
lose their last bits, 1001 becomes 1000) and takes sin/cos of bf16 angles, and its rotary
`inv_freq`, a buffer, is rounded to bf16 before the fp32 position product, then cos/sin and
the rotation are in bf16. The released weights were trained under those numerics. With
`reference_numerics` true, a model that runs in a 16-bit dtype (its weights, or autocast
when it is on) computes exactly those steps (`reference_fme_encoding`, `mra_rotary(...,
dtype)`, `apply_rotary`); with it false, the FME angles and the rotary tables are computed
in fp32 from the exact integers and the rotation in fp32, whatever the weights: more
accurate, not the reference's bf16 output. In fp32 the two settings compute the same (the
accurate path). The released presets (model=moonbeam_309m/839m) default to true, the tiny
preset, trained from scratch, to false (docs/moonbeam.md §3.7 says why).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from mehldau.constants import IGNORE_INDEX
from mehldau.errors import UserError
from mehldau.nn import checkpointing
from mehldau.nn.blocks import KV
from mehldau.nn.relative_attention import StaticKV

# Input columns: onset, duration, octave, pitch class, instrument, velocity; all but the
# instrument go through a Fundamental Music Embedding (docs/moonbeam.md §3.2).
SOS, EOS, PAD = -1, -2, -3  # special values of a whole input row (detected on onset only)
EOS_POSITION = 2**15  # every rotary position of an EOS row (§3.3 step 2)


@dataclass
class MoonbeamConfig:
    name: str = "custom"  # for error messages only
    hidden_size: int = 1536  # H; 6 attribute embeddings of H // 6 are concatenated
    intermediate_size: int = 5376
    num_hidden_layers: int = 9
    num_attention_heads: int = 12  # 6 MRA groups of 2 query heads
    num_key_value_heads: int = 6  # one KV head per MRA group
    rms_norm_eps: float = 1e-5
    onset_vocab_size: int = 1026  # T: output classes of Δonset (2 top ones = SOS/EOS)
    dur_vocab_size: int = 1026  # D
    octave_vocab_size: int = 13
    pitch_class_vocab_size: int = 14
    instrument_vocab_size: int = 131  # also the input instrument embedding's rows
    velocity_vocab_size: int = 130
    decode_vocab_size: int = 2341  # V = 1 + T + D + 13 + 14 + 131 + 130
    decoder_hidden_size: int = 1024  # G
    decoder_num_hidden_layers: int = 2
    # RoPE base per attribute; the instrument group is rotated by onset (§3.3 step 4).
    rope_theta_onset: float = 199999.0
    rope_theta_dur: float = 1031.0
    rope_theta_octave: float = 19.0
    rope_theta_pitch: float = 20.0
    rope_theta_velocity: float = 131.0
    # FME bases (§3.2). The configs give their values, not JSON keys, so `from_json`
    # keeps these defaults (equal to both released configs).
    fme_base_onset: float = 199999.0
    fme_base_dur: float = 1031.0
    fme_base_octave: float = 19.0
    fme_base_pitch: float = 20.0
    fme_base_velocity: float = 131.0
    max_len: int = 1024  # generation length cap of the reference sampler
    # In bf16/fp16, the FME and rotary angles as the reference computes them (module
    # docstring); no effect in fp32.
    reference_numerics: bool = False

    def __post_init__(self) -> None:
        H, nh, nkv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if H <= 0 or H % 6 or (H // 6) % 2:
            raise ValueError(f"hidden_size must be a positive multiple of 12, got {H}")
        if nkv != 6 or nh % nkv:
            raise ValueError(
                f"MRA needs 6 KV heads (one per attribute group) and a multiple of 6 query "
                f"heads, got {nh} / {nkv}"
            )
        if H % nh or (H // nh) % 2:
            raise ValueError(f"hidden_size {H} must split into {nh} heads of even size")
        expected_v = 1 + sum(
            (
                self.onset_vocab_size,
                self.dur_vocab_size,
                self.octave_vocab_size,
                self.pitch_class_vocab_size,
                self.instrument_vocab_size,
                self.velocity_vocab_size,
            )
        )
        if self.decode_vocab_size != expected_v:
            raise ValueError(
                f"decode_vocab_size {self.decode_vocab_size} != 1 + sum of the attribute "
                f"vocab sizes = {expected_v}"
            )
        for f in ("intermediate_size", "num_hidden_layers", "decoder_hidden_size",
                  "decoder_num_hidden_layers"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")
        if not isinstance(self.reference_numerics, bool):
            raise ValueError(f"reference_numerics must be true or false, got "
                             f"{self.reference_numerics!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def attribute_dim(self) -> int:  # d
        return self.hidden_size // 6

    @property
    def head_dim(self) -> int:  # hd
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_bases(self) -> tuple[float, ...]:  # per MRA group g = 0..5
        return (self.rope_theta_onset, self.rope_theta_dur, self.rope_theta_octave,
                self.rope_theta_pitch, self.rope_theta_onset, self.rope_theta_velocity)

    @property
    def vocab_offsets(self) -> dict[str, int]:
        """Offset of each attribute in the flat output vocabulary (§3.6); sos_out is id 0."""
        sizes = (("onset", self.onset_vocab_size), ("dur", self.dur_vocab_size),
                 ("octave", self.octave_vocab_size), ("pitch", self.pitch_class_vocab_size),
                 ("instrument", self.instrument_vocab_size),
                 ("velocity", self.velocity_vocab_size))
        out, off = {}, 1
        for a, n in sizes:
            out[a] = off
            off += n
        return out

    @classmethod
    def moonbeam_309m(cls) -> MoonbeamConfig:
        """`model_config_small.json`: fits `moonbeam_309M.pt` (309,424,128 params)."""
        return cls(name="309M")

    @classmethod
    def moonbeam_839m(cls) -> MoonbeamConfig:
        """`model_config.json`: fits `moonbeam_839M.pt` (838,847,744 params)."""
        return cls(name="839M", hidden_size=1920, intermediate_size=6720,
                   num_hidden_layers=15, onset_vocab_size=4099, dur_vocab_size=4099,
                   decode_vocab_size=8487, decoder_hidden_size=1536,
                   decoder_num_hidden_layers=4)

    @classmethod
    def tiny(cls) -> MoonbeamConfig:
        """A few-thousand-parameter model for CPU tests; not a released config."""
        return cls(name="tiny", hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                   onset_vocab_size=34, dur_vocab_size=34, decode_vocab_size=357,
                   decoder_hidden_size=32, decoder_num_hidden_layers=2, max_len=64)

    @classmethod
    def released(cls, name: str) -> MoonbeamConfig:
        if name not in RELEASED_CONFIGS:
            raise UserError(f"unknown Moonbeam config {name!r}; choose one of "
                            f"{', '.join(RELEASED_CONFIGS)} or pass a JSON config file")
        return RELEASED_CONFIGS[name]()

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> MoonbeamConfig:
        """Read the reference's config format (a HF LlamaConfig JSON with the Moonbeam keys
        and a `decoder` sub-dict); keys it has but this model does not use are ignored."""
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise UserError(f"Moonbeam config {path} does not exist") from None
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read Moonbeam config {path}: {e}") from None
        if not isinstance(raw, dict):
            raise UserError(f"Moonbeam config {path} is not a JSON object")
        decoder = raw.get("decoder")
        if not isinstance(decoder, dict):
            raise UserError(f"Moonbeam config {path} has no `decoder` object (GRU settings)")
        if raw.get("rope_scaling") is not None:
            raise UserError(f"Moonbeam config {path}: rope_scaling must be null for MRA")
        for key, want in (("attention_bias", False), ("mlp_bias", False),
                          ("tie_word_embeddings", False), ("hidden_act", "silu")):
            if key in raw and raw[key] != want:
                raise UserError(f"Moonbeam config {path}: {key} must be {want!r}, "
                                f"got {raw[key]!r}")
        if decoder.get("_attn_implementation", "GRU") != "GRU":
            raise UserError(f"Moonbeam config {path}: only the GRU sub-decoder is supported")
        kwargs: dict = {"name": os.path.basename(os.fspath(path))}
        own = {f.name for f in fields(cls)} - {"name"}
        for key in own:
            if key in raw:
                kwargs[key] = raw[key]
        try:
            kwargs["decoder_hidden_size"] = decoder["hidden_size"]
            kwargs["decoder_num_hidden_layers"] = decoder["num_hidden_layers"]
            for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                        "onset_vocab_size", "dur_vocab_size", "decode_vocab_size"):
                kwargs[key] = raw[key]
        except KeyError as e:
            raise UserError(f"Moonbeam config {path} lacks the key {e.args[0]!r}") from None
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise UserError(f"Moonbeam config {path} is invalid: {e}") from None


RELEASED_CONFIGS = {"309M": MoonbeamConfig.moonbeam_309m, "839M": MoonbeamConfig.moonbeam_839m}


@dataclass
class MoonbeamOutput:
    summary: torch.Tensor  # (B, L, G): sub-decoder initial state per position (ref: `logits`)
    logits: torch.Tensor | None = None  # (B, L-1, 6, V): teacher-forced, with labels (not
    # kept when training with activation checkpointing: only the losses are)
    loss: torch.Tensor | None = None  # nats per event: the sum of attribute_loss
    attribute_loss: torch.Tensor | None = None  # (6,) mean cross-entropy of each attribute
    past_key_values: list[KV | StaticKV] | None = None


# The rate and frequency tables below depend only on sizes, bases, device and dtype; computed
# once per combination rather than at every call (a sampled event made 15 float64 `pow`s and
# as many `arange`s for them). Callers must not modify the tables they get.
@functools.lru_cache(maxsize=64)
def _fme_table(d: int, base: float, device: torch.device, dtype: torch.dtype | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rate (d,), even (d,) bool): fp32 from float64 when dtype is None, else the
    reference's fp32 CPU expression rounded to `dtype`."""
    with torch.inference_mode(False):  # a table made while sampling serves training too
        return _make_fme_table(d, base, device, dtype)


def _make_fme_table(d: int, base: float, device: torch.device, dtype: torch.dtype | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    if dtype is None:
        j = torch.arange(d, device=device)
        rate = torch.pow(torch.tensor(float(base), dtype=torch.float64, device=device),
                         -(2 * (j // 2)).double() / d).float()
    else:
        j = torch.arange(d)  # the reference's table: its expression, in fp32, on the CPU
        rate = (1 / torch.pow(base, (2 * (j // 2)) / d)).to(device, dtype)
        j = j.to(device)
    return rate, j % 2 == 0


def fme_encoding(x: torch.Tensor, d: int, base: float) -> torch.Tensor:
    """The FME's sinusoid in fp32: (...,) integers -> (..., d), with sin at even and cos at
    odd j (interleaved, unlike RoPE's halves) and rate_j = base^(-2*floor(j/2)/d)."""
    rate, even = _fme_table(d, float(base), x.device, None)  # (d,)
    angle = x.float()[..., None] * rate  # (..., d)
    return torch.where(even, torch.sin(angle), torch.cos(angle))


def reference_fme_encoding(x: torch.Tensor, d: int, base: float,
                           dtype: torch.dtype) -> torch.Tensor:
    """The FME's sinusoid as the reference computes it in `dtype` (§3.7): its fp32 rate
    table rounded to `dtype`, the integers cast to `dtype` before the product, sin/cos of
    those angles in `dtype`. (...,) -> (..., d)."""
    rate, even = _fme_table(d, float(base), x.device, dtype)  # (d,)
    angle = x.to(dtype)[..., None] * rate  # in bf16, 1001 * rate is 1000 * rate
    return torch.where(even, torch.sin(angle), torch.cos(angle))


def compute_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a Linear layer computes in: autocast's when it is on for the layer's device,
    else its weight's, or a 4-bit layer's compute dtype (its packed weight is uint8)."""
    base = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear  # peft
    weight = base.weight
    if torch.is_autocast_enabled(weight.device.type):
        return torch.get_autocast_dtype(weight.device.type)
    if weight.is_floating_point():
        return weight.dtype
    return getattr(base, "compute_dtype", None) or torch.float32


class FundamentalMusicEmbedding(nn.Module):
    def __init__(self, d: int, base: float) -> None:
        super().__init__()
        self.d, self.base = d, base
        self.translation_bias = nn.Parameter(torch.zeros(1, d))
        self.linear_fme = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, reference: torch.dtype | None = None) -> torch.Tensor:
        """(B, L) int -> (B, L, d); `reference`: the 16-bit dtype whose reference numerics to
        follow (`MoonbeamModel.reference_dtype`), None for the accurate fp32 angles."""
        if reference is not None:
            pe = reference_fme_encoding(x, self.d, self.base, reference)
            return self.linear_fme(pe + self.translation_bias.to(reference))
        pe = fme_encoding(x, self.d, self.base) + self.translation_bias.float()
        return self.linear_fme(pe.to(compute_dtype(self.linear_fme)))


class InstrumentEmbedding(nn.Module):
    """Only a wrapper so the key is `instrument_embedding.embedding.weight`."""

    def __init__(self, n: int, d: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, 6) tokens -> (B, L, 6) rotary positions: SOS rows -> 0, EOS rows -> 2^15,
    specials detected on the onset column only; other rows (pads included) as they are."""
    onset = input_ids[..., :1]
    pos = torch.where(onset == SOS, torch.zeros_like(input_ids), input_ids)
    return torch.where(onset == EOS, torch.full_like(input_ids, EOS_POSITION), pos)


def mra_rotary(positions: torch.Tensor, head_dim: int, bases: tuple[float, ...],
               reference: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, 6) positions -> cos, sin of shape (B, 6, L, hd), group g rotated by column
    (0, 1, 2, 3, 0, 5)[g] with base bases[g]; HF rotate-half layout. In fp32 from exact
    rates; with `reference` (a 16-bit dtype), as the reference computes them there: its fp32
    `inv_freq` rounded to that dtype, the product in fp32, cos/sin cast to it."""
    cols = positions[..., [0, 1, 2, 3, 0, 5]].float()  # (B, L, 6); exact below 2^24
    inv_freq = _inv_freq(head_dim, tuple(bases), positions.device, reference)  # (6, hd/2)
    freqs = cols.transpose(1, 2)[..., None] * inv_freq[None, :, None, :]  # (B,6,L,hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, 6, L, hd)
    if reference is None:
        return emb.cos(), emb.sin()
    return emb.cos().to(reference), emb.sin().to(reference)


@functools.lru_cache(maxsize=64)
def _inv_freq(head_dim: int, bases: tuple[float, ...], device: torch.device,
              reference: torch.dtype | None) -> torch.Tensor:
    """mra_rotary's (6, hd/2) fp32 frequencies, computed once per combination."""
    with torch.inference_mode(False):  # a table made while sampling serves training too
        return _make_inv_freq(head_dim, bases, device, reference)


def _make_inv_freq(head_dim: int, bases: tuple[float, ...], device: torch.device,
                   reference: torch.dtype | None) -> torch.Tensor:
    if reference is None:
        base = torch.tensor(bases, dtype=torch.float64, device=device)  # (6,)
        exps = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
        return base[:, None].pow(-exps).float()  # (6, hd/2)
    # the reference's buffer, 1 / base^(2i/hd) in fp32 on the CPU, cast with the model
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return torch.stack([1.0 / (b ** exps) for b in bases]).to(device, reference).float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, cos/sin broadcast to x: in fp32 and cast back for
    fp32 tables (the accurate path), in x's dtype for the reference's 16-bit ones."""
    if cos.dtype != torch.float32:
        return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)
    h = x.float()
    return (h * cos + rotate_half(h) * sin).to(x.dtype)


class MRAttention(nn.Module):
    def __init__(self, config: MoonbeamConfig) -> None:
        super().__init__()
        H, self.n_heads, self.n_kv = (config.hidden_size, config.num_attention_heads,
                                      config.num_key_value_heads)
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(H, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(H, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, H, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, past: KV | StaticKV | None = None
                ) -> tuple[torch.Tensor, KV | StaticKV]:
        B, L, _ = x.shape
        rep = self.n_heads // self.n_kv
        q = self.q_proj(x).view(B, L, self.n_kv, rep, self.head_dim).permute(0, 2, 3, 1, 4)
        k = self.k_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # (B,6,L,hd)
        v = self.v_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        # Q heads {2g, 2g+1} and KV head g share group g's rotation.
        q = apply_rotary(q, cos[:, :, None], sin[:, :, None]).reshape(B, self.n_heads, L, -1)
        k = apply_rotary(k, cos, sin)
        # The cache holds rotated keys: written in place into a `StaticKV`, or (the plain
        # path the static one is tested against) grown by concatenation.
        present: KV | StaticKV
        if isinstance(past, StaticKV):
            k, v = past.extend(k, v)
            present = past
        else:
            if past is not None:
                k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
            present = (k, v)
        if isinstance(past, StaticKV) and L == 1 and mask is None:
            # One event against the cache: SDPA's grouped-query mode reads KV head g for Q
            # heads 2g, 2g+1 without the copies below, which write twice the whole cache per
            # layer and event (4x slower attention at 2,048 positions, hd 256, on the CPU);
            # the same numbers on the CPU (tested against the plain path event for event).
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            return self.o_proj(y.transpose(1, 2).reshape(B, L, -1)), present
        k = k.repeat_interleave(rep, dim=1)  # KV head g serves Q heads 2g, 2g+1
        v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1)), present  # (B, L, H)


def cached_length(past: KV | StaticKV) -> int:
    """Positions one layer's cache holds."""
    return past.length if isinstance(past, StaticKV) else past[0].shape[2]


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: MoonbeamConfig) -> None:
        super().__init__()
        self.self_attn = MRAttention(config)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, past: KV | StaticKV | None = None
                ) -> tuple[torch.Tensor, KV | StaticKV]:
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), present


class MoonbeamModel(nn.Module):
    """The backbone: compound embedding + MRA LLaMA layers + final norm (keys `model.*`)."""

    activation_checkpointing = False  # `mehldau.nn.checkpointing`: recompute each layer

    def __init__(self, config: MoonbeamConfig) -> None:
        super().__init__()
        self.config = config
        d, H = config.attribute_dim, config.hidden_size
        self.onset_embedding = FundamentalMusicEmbedding(d, config.fme_base_onset)
        self.dur_embedding = FundamentalMusicEmbedding(d, config.fme_base_dur)
        self.octave_embedding = FundamentalMusicEmbedding(d, config.fme_base_octave)
        self.pitch_embedding = FundamentalMusicEmbedding(d, config.fme_base_pitch)
        self.instrument_embedding = InstrumentEmbedding(config.instrument_vocab_size, d)
        self.velocity_embedding = FundamentalMusicEmbedding(d, config.fme_base_velocity)
        self.supplementary_embedding = nn.Embedding(2, H)  # row 0 SOS, row 1 EOS
        self.supplementary_MLP = nn.Sequential(
            nn.Linear(H, H // 2), nn.ReLU(), nn.Linear(H // 2, H)
        )
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(H, config.rms_norm_eps)

    def reference_dtype(self) -> torch.dtype | None:
        """The 16-bit dtype the model runs in (its weights', or autocast's) when
        `reference_numerics` asks for the reference's angles there; None: the fp32 ones."""
        if not self.config.reference_numerics:
            return None
        dtype = compute_dtype(self.onset_embedding.linear_fme)
        return dtype if dtype.itemsize < 4 else None

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B,L,6) -> (B,L,H)
        onset = input_ids[..., :1]
        is_sos, is_eos = onset == SOS, onset == EOS  # (B, L, 1)
        ids = input_ids.masked_fill(is_sos | is_eos, 0)  # keep the lookups valid
        ref = self.reference_dtype()
        parts = [
            self.onset_embedding(ids[..., 0], ref),
            self.dur_embedding(ids[..., 1], ref),
            self.octave_embedding(ids[..., 2], ref),
            self.pitch_embedding(ids[..., 3], ref),
            self.instrument_embedding(ids[..., 4]),
            self.velocity_embedding(ids[..., 5], ref),
        ]
        x = torch.cat(parts, dim=-1)  # concatenated, not summed
        sup = self.supplementary_embedding.weight.to(x.dtype)
        x = torch.where(is_sos, sup[0], x)
        x = torch.where(is_eos, sup[1], x)
        return self.supplementary_MLP(x)  # every position, specials included; no residual

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: list[KV | StaticKV] | None = None,
                ) -> tuple[torch.Tensor, list[KV | StaticKV]]:
        B, L, _ = input_ids.shape
        x = self.embed_tokens(input_ids)
        cos, sin = mra_rotary(rotary_positions(input_ids), self.config.head_dim,
                              self.config.rope_bases, self.reference_dtype())
        past_len = 0 if past_key_values is None else cached_length(past_key_values[0])
        mask = None
        if attention_mask is not None:
            if past_len:
                raise ValueError("attention_mask (packed sample ids) is for training; "
                                 "it cannot be combined with a KV cache")
            # Packed training: attend within the same sample id, causally.
            same = attention_mask[:, :, None] == attention_mask[:, None, :]  # (B, L, L)
            causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            mask = (same & causal)[:, None]  # (B, 1, L, L)
        elif past_len and L > 1:
            mask = torch.ones(L, past_len + L, dtype=torch.bool, device=x.device).tril(past_len)
        presents = []
        recompute = self.activation_checkpointing and self.training and not past_len
        for i, layer in enumerate(self.layers):
            x, present = checkpointing.run(
                recompute, layer, x, cos, sin, mask,
                None if past_key_values is None else past_key_values[i])
            presents.append(present)
        return self.norm(x), presents


class OutputGRU(nn.Module):
    """Keys `decoder.gru.*`, `decoder.fc_out.*`."""

    def __init__(self, hidden: int, num_layers: int) -> None:
        super().__init__()
        self.gru = nn.GRU(hidden, hidden, num_layers=num_layers, batch_first=True)
        self.fc_out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, h = self.gru(x, h)  # (N, k, G), (NG, N, G)
        return self.fc_out(out), h  # no activation before lm_head


class MoonbeamForCausalLM(nn.Module):
    # What `adapter.ffn` / `adapter.embeddings` add to LoRA's targets (mehldau.adapters.lora):
    # the SwiGLU projections, and the compound input embedding of §3.2 (each FME's
    # `linear_fme`, the instrument and SOS/EOS tables, the embedding MLP) with the output
    # side (`decoder_embedding`, `lm_head`, in the reference's default targets already).
    adapter_groups = {
        "ffn": ("gate_proj", "up_proj", "down_proj"),
        "embeddings": ("linear_fme", "instrument_embedding.embedding", "supplementary_embedding",
                       "supplementary_MLP.0", "supplementary_MLP.2", "decoder_embedding",
                       "lm_head"),
    }

    def __init__(self, config: MoonbeamConfig) -> None:
        super().__init__()
        self.config = config
        G, V = config.decoder_hidden_size, config.decode_vocab_size
        self.model = MoonbeamModel(config)
        self.decoder = OutputGRU(G, config.decoder_num_hidden_layers)
        self.decoder_embedding = nn.Embedding(V, G)
        self.summary_projection = nn.Linear(config.hidden_size, G, bias=False)
        self.lm_head = nn.Linear(G, V, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """Random init, for training from scratch (released weights replace it).

        Linear layers: normal with std = fan_in^-1/2; embeddings: normal 0.02; zero biases;
        the GRU keeps PyTorch's own. HF Llama's 0.02 for every layer (the reference) is about
        fan_in^-1/2 at the released widths (1,536 and 1,920), but at the tiny preset's width
        (192) it left the model stuck at the unigram baseline: on one fixed batch of 4 x 64
        demo events, 100 AdamW steps at lr 1e-3 reached 14.0 nats/event with 0.02 and 0.19
        with fan_in^-1/2.
        """
        for name, m in self.named_modules():
            if name.startswith("decoder.gru"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def decode(self, summary: torch.Tensor, ids: torch.Tensor,
               h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the GRU over flat ids: summary (N, G) is the initial state of every layer
        (used only when h is None), ids (N, k) -> logits (N, k, V) and the new state, so a
        sampler can feed one id at a time starting from id 0 (`sos_out`)."""
        if h is None:
            h = summary[None].expand(self.config.decoder_num_hidden_layers, -1, -1).contiguous()
        x = self.decoder_embedding(ids)  # (N, k, G)
        out, h = self.decoder(x, h.to(x.dtype))
        return self.lm_head(out), h

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                past_key_values: list[KV | StaticKV] | None = None,
                use_cache: bool = False) -> MoonbeamOutput:
        """input_ids (B, L, 6) raw values (also the MRA positions); labels (B, L, 7) flat ids
        [0, Δonset, dur, oct, pc, instr, vel], rows of IGNORE_INDEX (-100) have no target
        (padding, a packed sample's SOS); attention_mask (B, L) packed sample ids."""
        h, presents = self.model(input_ids, attention_mask, past_key_values)
        summary = self.summary_projection(h)  # (B, L, G)
        out = MoonbeamOutput(summary=summary, past_key_values=presents if use_cache else None)
        if labels is None:
            return out
        B, L, _ = input_ids.shape
        nxt = labels[:, 1:]  # position t predicts the attributes of token t+1
        s = summary[:, :-1].reshape(B * (L - 1), -1)
        gru_in = nxt[..., :6].clamp(min=0).reshape(B * (L - 1), 6)  # ignored rows feed id 0
        target = nxt[..., 1:]  # (B, L-1, 6)
        if self.model.activation_checkpointing and self.training and not use_cache:
            # The GRU head's logits (6 x 2,341 per event) outweigh a backbone layer: recompute
            # them in the backward pass too, and keep only the losses.
            ce = checkpointing.run(True, self._head_loss, s, gru_in, target.reshape(-1))
        else:
            logits, _ = self.decode(s, gru_in)  # teacher forcing
            out.logits = logits.view(B, L - 1, 6, -1)
            ce = F.cross_entropy(out.logits.float().flatten(0, 2), target.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="none")
        ce = ce.view_as(target)
        # Nats per event: the sum of the six attributes' mean cross-entropies over the rows
        # that have targets (the reference instead averages over all 6 * B * (L-1) targets,
        # pads included: a sixth of this, diluted by padding).
        valid = (target != IGNORE_INDEX).float()  # (B, L-1, 6)
        out.attribute_loss = (ce * valid).sum((0, 1)) / valid.sum((0, 1)).clamp(min=1)  # (6,)
        out.loss = out.attribute_loss.sum()
        return out


    def _head_loss(self, summary: torch.Tensor, gru_in: torch.Tensor, target: torch.Tensor
                   ) -> torch.Tensor:
        """Per-target cross-entropy (N * 6,) of the teacher-forced GRU head."""
        logits, _ = self.decode(summary, gru_in)  # (N, 6, V)
        return F.cross_entropy(logits.float().flatten(0, 1), target,
                               ignore_index=IGNORE_INDEX, reduction="none")


def load_released(path: str | os.PathLike, config: MoonbeamConfig | str,
                  dtype: torch.dtype | None = None) -> MoonbeamForCausalLM:
    """Load a released (or same-format) checkpoint strictly into a model of `config` (a
    `MoonbeamConfig` or "309M" / "839M"), on the CPU, in fp32 by default (the stored bf16
    tensors are upcast, as the reference loader does) or in `dtype`. Raises `UserError` for
    a missing or unreadable file and for the first key whose shape the config does not fit."""
    if isinstance(config, str):
        config = MoonbeamConfig.released(config)
    if not os.path.isfile(path):
        raise UserError(f"Moonbeam checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have no common base class
        raise UserError(f"cannot read Moonbeam checkpoint {path}: {e}") from None
    sd = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise UserError(f"{path} holds no state_dict (expected a dict or `model_state_dict`)")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    # Built on meta and then given the file's tensors: no init pass, no second fp32 copy.
    with torch.device("meta"):
        model = MoonbeamForCausalLM(config)
    expected = model.state_dict()
    for k, want in expected.items():
        if k not in sd:
            raise UserError(f"{path} lacks {k}, which the {config.name} config expects; "
                            f"is it a Moonbeam checkpoint of that size?")
        got = sd[k]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise UserError(f"{path}: {k} has shape {shape} but the {config.name} config "
                            f"expects {tuple(want.shape)}; pick the config that matches")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise UserError(f"{path} has {len(extra)} key(s) the {config.name} config lacks, "
                        f"first {extra[0]}")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(torch.float32 if dtype is None else dtype).eval()


__all__ = [
    "MoonbeamConfig", "MoonbeamForCausalLM", "MoonbeamModel", "MoonbeamOutput",
    "FundamentalMusicEmbedding", "RELEASED_CONFIGS", "fme_encoding", "load_released",
    "mra_rotary", "reference_fme_encoding", "rotary_positions",
]
