"""Moonbeam (`mehldau.nn.moonbeam`): the released parameter layout, strict loading of a
checkpoint in the released format, and the FME / MRA maths against hand-computed cases.

The expected tables below are written from `docs/moonbeam.md` §1.2, not from
the model, so a renamed or reshaped parameter fails here before it fails on a real file.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from mehldau.errors import UserError
from mehldau.nn.moonbeam import (
    FundamentalMusicEmbedding,
    MoonbeamConfig,
    MoonbeamForCausalLM,
    apply_rotary,
    fme_encoding,
    load_released,
    mra_rotary,
    rotary_positions,
)

FME = ("onset", "dur", "octave", "pitch", "velocity")


def spec_table(H: int, I: int, N: int, KV: int, G: int, NG: int, V: int) -> dict:  # noqa: E741
    d = H // 6
    t: dict[str, tuple[int, ...]] = {}
    for a in FME:
        t[f"model.{a}_embedding.translation_bias"] = (1, d)
        t[f"model.{a}_embedding.linear_fme.weight"] = (d, d)
        t[f"model.{a}_embedding.linear_fme.bias"] = (d,)
    t["model.instrument_embedding.embedding.weight"] = (131, d)
    t["model.supplementary_embedding.weight"] = (2, H)
    t["model.supplementary_MLP.0.weight"] = (H // 2, H)
    t["model.supplementary_MLP.0.bias"] = (H // 2,)
    t["model.supplementary_MLP.2.weight"] = (H, H // 2)
    t["model.supplementary_MLP.2.bias"] = (H,)
    for i in range(N):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = (H, H)
        t[p + "self_attn.k_proj.weight"] = (KV, H)
        t[p + "self_attn.v_proj.weight"] = (KV, H)
        t[p + "self_attn.o_proj.weight"] = (H, H)
        t[p + "mlp.gate_proj.weight"] = (I, H)
        t[p + "mlp.up_proj.weight"] = (I, H)
        t[p + "mlp.down_proj.weight"] = (H, I)
        t[p + "input_layernorm.weight"] = (H,)
        t[p + "post_attention_layernorm.weight"] = (H,)
    t["model.norm.weight"] = (H,)
    for k in range(NG):
        t[f"decoder.gru.weight_ih_l{k}"] = (3 * G, G)
        t[f"decoder.gru.weight_hh_l{k}"] = (3 * G, G)
        t[f"decoder.gru.bias_ih_l{k}"] = (3 * G,)
        t[f"decoder.gru.bias_hh_l{k}"] = (3 * G,)
    t["decoder.fc_out.weight"] = (G, G)
    t["decoder.fc_out.bias"] = (G,)
    t["decoder_embedding.weight"] = (V, G)
    t["summary_projection.weight"] = (G, H)
    t["lm_head.weight"] = (V, G)
    return t


RELEASED = {
    # config, docs table, total params, tensor count (docs/moonbeam.md §1.1, §1.2)
    "309M": (MoonbeamConfig.moonbeam_309m, spec_table(1536, 5376, 9, 768, 1024, 2, 2341),
             309_424_128, 116),
    "839M": (MoonbeamConfig.moonbeam_839m, spec_table(1920, 6720, 15, 960, 1536, 4, 8487),
             838_847_744, 178),
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_layout_matches_spec(name: str) -> None:
    make, table, total, count = RELEASED[name]
    config = make()
    assert config is not None and MoonbeamConfig.released(name) == config
    with torch.device("meta"):
        model = MoonbeamForCausalLM(config)
    sd = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == table
    assert sum(v.numel() for v in sd.values()) == total
    assert len(sd) == count
    assert list(model.buffers()) == []  # nothing but parameters may be saved


def test_released_config_values() -> None:
    small, big = MoonbeamConfig.moonbeam_309m(), MoonbeamConfig.moonbeam_839m()
    for c in (small, big):
        assert (c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps) == (12, 6, 1e-5)
        assert c.rope_bases == (199999, 1031, 19, 20, 199999, 131)
    assert small.vocab_offsets == {"onset": 1, "dur": 1027, "octave": 2053, "pitch": 2066,
                                   "instrument": 2080, "velocity": 2211}
    assert big.vocab_offsets == {"onset": 1, "dur": 4100, "octave": 8199, "pitch": 8212,
                                 "instrument": 8226, "velocity": 8357}
    with pytest.raises(UserError, match="unknown Moonbeam config"):
        MoonbeamConfig.released("1B")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="decode_vocab_size"):
        replace(MoonbeamConfig.tiny(), decode_vocab_size=100)
    with pytest.raises(ValueError, match="6 KV heads"):
        replace(MoonbeamConfig.tiny(), num_key_value_heads=4)
    with pytest.raises(ValueError, match="multiple of 12"):
        replace(MoonbeamConfig.tiny(), hidden_size=90)


def reference_json(c: MoonbeamConfig) -> dict:
    """A config in the reference's format, with the keys this model ignores."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": 12,
        "num_key_value_heads": 6, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": False, "attn_implementation": "sdpa", "max_len": 1024,
        "rope_theta": 500000.0, "max_position_embeddings": 8192, "rope_scaling": None,
        "sos_token": -1, "eos_token": -2, "pad_token": -3, "torch_dtype": "bfloat16",
        "onset_vocab_size": c.onset_vocab_size, "dur_vocab_size": c.dur_vocab_size,
        "octave_vocab_size": 13, "pitch_class_vocab_size": 14, "instrument_vocab_size": 131,
        "velocity_vocab_size": 130, "decode_vocab_size": c.decode_vocab_size,
        "rope_theta_onset": 199999, "rope_theta_dur": 1031, "rope_theta_octave": 19,
        "rope_theta_pitch": 20, "rope_theta_velocity": 131,
        "decoder": {"hidden_size": c.decoder_hidden_size,
                    "num_hidden_layers": c.decoder_num_hidden_layers,
                    "num_attention_heads": 8, "max_position_embeddings": 7,
                    "_attn_implementation": "GRU"},
    }


@pytest.mark.parametrize("name", list(RELEASED))
def test_from_json_reads_reference_format(tmp_path, name: str) -> None:
    want = RELEASED[name][0]()
    path = tmp_path / "model_config.json"
    path.write_text(json.dumps(reference_json(want)))
    got = MoonbeamConfig.from_json(path)
    assert replace(got, name=want.name) == want


def test_from_json_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        MoonbeamConfig.from_json(tmp_path / "nope.json")
    bad = reference_json(MoonbeamConfig.moonbeam_309m())
    bad["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (tmp_path / "a.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="rope_scaling"):
        MoonbeamConfig.from_json(tmp_path / "a.json")
    bad = reference_json(MoonbeamConfig.moonbeam_309m())
    bad["decode_vocab_size"] = 4099
    (tmp_path / "b.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="decode_vocab_size"):
        MoonbeamConfig.from_json(tmp_path / "b.json")
    bad = reference_json(MoonbeamConfig.moonbeam_309m())
    del bad["decoder"]["hidden_size"]
    (tmp_path / "c.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="hidden_size"):
        MoonbeamConfig.from_json(tmp_path / "c.json")


def random_batch(c: MoonbeamConfig, B: int = 2, L: int = 7, seed: int = 0):
    """Tokens [SOS] + events + [EOS] with absolute onsets, and matching flat-id labels."""
    g = torch.Generator().manual_seed(seed)
    n = L - 2
    dt = torch.randint(0, 10, (B, n), generator=g)
    ev = torch.stack([
        dt.cumsum(1),
        torch.randint(1, c.dur_vocab_size - 2, (B, n), generator=g),
        torch.randint(0, 11, (B, n), generator=g),
        torch.randint(0, 12, (B, n), generator=g),
        torch.randint(0, 129, (B, n), generator=g),
        torch.randint(1, 128, (B, n), generator=g),
    ], dim=-1)  # (B, n, 6)
    ids = torch.cat([torch.full((B, 1, 6), -1), ev, torch.full((B, 1, 6), -2)], dim=1)
    off = c.vocab_offsets
    raw = torch.cat([dt[..., None], ev[..., 1:]], dim=-1)  # Δonset instead of onset
    flat = raw + torch.tensor([off[a] for a in ("onset", "dur", "octave", "pitch",
                                                "instrument", "velocity")])
    sos = torch.tensor([c.onset_vocab_size - 2, c.dur_vocab_size - 2, 11, 12, 129, 128])
    eos = sos + 1
    off_t = torch.tensor(list(off.values()))
    rows = torch.cat([(sos + off_t).expand(B, 1, 6), flat, (eos + off_t).expand(B, 1, 6)], 1)
    labels = torch.cat([torch.zeros(B, L, 1, dtype=torch.long), rows], dim=-1)  # (B, L, 7)
    return ids, labels


def tiny_model(seed: int = 0) -> MoonbeamForCausalLM:
    torch.manual_seed(seed)
    model = MoonbeamForCausalLM(MoonbeamConfig.tiny()).eval()
    with torch.no_grad():  # non-trivial values where the init leaves constants
        for p in model.parameters():
            if p.dim() == 1 or p.shape[0] == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_released(model: MoonbeamForCausalLM, path) -> None:
    """The official saver's layout: DDP `module.` keys, bf16 tensors, training extras."""
    sd = {f"module.{k}": v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "step": 100, "model_state_dict": sd, "optimizer_state_dict": {}},
               path)


def test_released_format_loads_strictly_and_reproduces_logits(tmp_path) -> None:
    model = tiny_model()
    ids, labels = random_batch(model.config)
    with torch.no_grad():
        ref = model(ids, labels=labels)
    path = tmp_path / "moonbeam_tiny.pt"
    save_released(model, path)
    loaded = load_released(path, MoonbeamConfig.tiny())
    assert not loaded.training
    with torch.no_grad():
        got = loaded(ids, labels=labels)
        # The same weights rounded to bf16 give (numerically) the same model.
        rounded = tiny_model()
        rounded.load_state_dict({k: v.to(torch.bfloat16).float()
                                 for k, v in model.state_dict().items()})
        exact = rounded(ids, labels=labels)
    torch.testing.assert_close(got.logits, exact.logits)
    torch.testing.assert_close(got.logits, ref.logits, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.summary, ref.summary, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-2, rtol=1e-2)
    bf16 = load_released(path, MoonbeamConfig.tiny(), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    with torch.no_grad():
        out = bf16(ids, labels=labels)
    torch.testing.assert_close(out.logits.float(), ref.logits, atol=5e-2, rtol=5e-2)


def test_plain_state_dict_also_loads(tmp_path) -> None:
    model = tiny_model()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    loaded = load_released(tmp_path / "plain.pt", MoonbeamConfig.tiny())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, atol=0, rtol=0)


def test_wrong_shape_names_first_key_and_config(tmp_path) -> None:
    path = tmp_path / "moonbeam_tiny.pt"
    save_released(tiny_model(), path)
    wide = replace(MoonbeamConfig.tiny(), name="tiny-wide", hidden_size=120)
    with pytest.raises(UserError, match=r"model\.onset_embedding\.translation_bias.*tiny-wide"):
        load_released(path, wide)


def test_tiny_checkpoint_against_released_config(tmp_path) -> None:
    # The real-size model is built on meta by the loader, so this check costs nothing.
    path = tmp_path / "moonbeam_tiny.pt"
    save_released(tiny_model(), path)
    with pytest.raises(UserError, match=r"translation_bias has shape \(1, 16\) but the 309M "
                                        r"config expects \(1, 256\)"):
        load_released(path, "309M")
    with pytest.raises(UserError, match="unknown Moonbeam config"):
        load_released(path, "tiny")


def test_missing_and_unexpected_keys(tmp_path) -> None:
    sd = tiny_model().state_dict()
    torch.save({"model_state_dict": {k: v for k, v in sd.items() if k != "lm_head.weight"}},
               tmp_path / "a.pt")
    with pytest.raises(UserError, match="lacks lm_head.weight"):
        load_released(tmp_path / "a.pt", MoonbeamConfig.tiny())
    torch.save({**sd, "model.extra": torch.zeros(1)}, tmp_path / "b.pt")
    with pytest.raises(UserError, match="model.extra"):
        load_released(tmp_path / "b.pt", MoonbeamConfig.tiny())


def test_missing_or_unreadable_file(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_released(tmp_path / "moonbeam_309M.pt", MoonbeamConfig.moonbeam_309m())
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_released(tmp_path / "junk.pt", MoonbeamConfig.tiny())


def test_fme_interleaves_sin_and_cos() -> None:
    # d = 4, base 100: rates (1, 1, 100^-1/2, 100^-1/2) = (1, 1, 0.1, 0.1)
    got = fme_encoding(torch.tensor([3, 0]), 4, 100.0)
    want = torch.tensor([[math.sin(3), math.cos(3), math.sin(0.3), math.cos(0.3)],
                         [0.0, 1.0, 0.0, 1.0]])
    torch.testing.assert_close(got, want)
    fme = FundamentalMusicEmbedding(4, 100.0)
    with torch.no_grad():
        fme.translation_bias.copy_(torch.tensor([[0.5, -0.5, 1.0, 2.0]]))
        fme.linear_fme.weight.copy_(torch.eye(4))
        fme.linear_fme.bias.fill_(1.0)
    # The bias goes in after sin/cos and before the linear layer.
    torch.testing.assert_close(fme(torch.tensor([[3]]))[0, 0],
                               want[0] + torch.tensor([0.5, -0.5, 1.0, 2.0]) + 1.0)


def test_fme_is_fp32_under_bf16_weights() -> None:
    fme = FundamentalMusicEmbedding(64, 199999.0).to(torch.bfloat16)
    # The reference casts 1001 to bf16 (= 1000); without reference_numerics the two stay
    # distinct.
    assert not torch.equal(fme_encoding(torch.tensor(1001), 64, 199999.0),
                           fme_encoding(torch.tensor(1000), 64, 199999.0))
    assert fme(torch.tensor([[1001]])).dtype == torch.bfloat16


def test_rotary_positions_remap_specials() -> None:
    ids = torch.tensor([[[-1] * 6, [5, 3, 4, 7, 0, 90], [-2] * 6, [0] * 6, [-3] * 6]])
    pos = rotary_positions(ids)
    assert pos.tolist() == [[[0] * 6, [5, 3, 4, 7, 0, 90], [32768] * 6, [0] * 6, [-3] * 6]]


def test_each_head_group_rotates_by_its_attribute() -> None:
    hd, bases = 8, (199999.0, 1031.0, 19.0, 20.0, 199999.0, 131.0)
    pos = torch.tensor([[[11, 22, 3, 4, 55, 66]]])  # (B=1, L=1, 6)
    cos, sin = mra_rotary(pos, hd, bases)  # (1, 6, 1, hd)
    # Group 4 (instrument heads) is rotated by onset, not by the instrument column.
    for g, col in enumerate((0, 1, 2, 3, 0, 5)):
        p = pos[0, 0, col].item()
        for i in range(hd // 2):
            angle = p * bases[g] ** (-2 * i / hd)
            x = torch.zeros(hd)
            x[i] = 1.0  # the pair (i, i + hd/2) is rotated by `angle` (rotate-half layout)
            y = apply_rotary(x, cos[0, g, 0], sin[0, g, 0])
            want = torch.zeros(hd)
            want[i], want[i + hd // 2] = math.cos(angle), math.sin(angle)
            torch.testing.assert_close(y, want, atol=1e-5, rtol=0)


def test_attention_is_relative_in_every_attribute() -> None:
    model = tiny_model()
    attn = model.model.layers[0].self_attn
    c = model.config
    x = torch.randn(1, 6, c.hidden_size)
    pos = torch.randint(0, 50, (1, 6, 6))
    shifted = pos + torch.tensor([7, 3, 1, 2, 0, 5])  # instrument unused: onset drives group 4
    outs = []
    with torch.no_grad():
        for p in (pos, shifted):
            cos, sin = mra_rotary(p, c.head_dim, c.rope_bases)
            outs.append(attn(x, cos, sin, None)[0])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)


def test_kv_cache_matches_full_forward() -> None:
    model = tiny_model()
    ids, _ = random_batch(model.config, L=8)
    with torch.no_grad():
        full = model(ids).summary
        out = model(ids[:, :3], use_cache=True)
        steps = [out.summary]
        past = out.past_key_values
        for t in range(3, 8):
            out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.summary)
        two = model(ids[:, 6:], past_key_values=model(ids[:, :6], use_cache=True)
                    .past_key_values).summary
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two, full[:, 6:], atol=1e-5, rtol=1e-5)


def test_packed_samples_do_not_see_each_other() -> None:
    # With no sequence-index position, a packed sample's outputs equal its outputs alone.
    model = tiny_model()
    a, _ = random_batch(model.config, B=1, L=5, seed=1)
    b, _ = random_batch(model.config, B=1, L=6, seed=2)
    packed = torch.cat([a, b], dim=1)
    ids = torch.tensor([[0] * 5 + [1] * 6])
    with torch.no_grad():
        out = model(packed, attention_mask=ids).summary
        alone = model(b).summary
    torch.testing.assert_close(out[:, 5:], alone, atol=1e-5, rtol=1e-5)


def test_teacher_forced_loss_and_gru_inputs() -> None:
    model = tiny_model()
    c = model.config
    ids, labels = random_batch(c, B=2, L=6)
    with torch.no_grad():
        out = model(ids, labels=labels)
    B, L = ids.shape[:2]
    assert out.summary.shape == (B, L, c.decoder_hidden_size)
    assert out.logits.shape == (B, L - 1, 6, c.decode_vocab_size)
    # Nats per event = the sum over the six attributes of each one's cross-entropy.
    per_attr = [torch.nn.functional.cross_entropy(out.logits[:, :, a].flatten(0, 1),
                                                  labels[:, 1:, 1 + a].reshape(-1))
                for a in range(6)]
    torch.testing.assert_close(out.loss, sum(per_attr))
    torch.testing.assert_close(out.attribute_loss, torch.stack(per_attr))
    # Ignored rows (padding) change nothing: the loss of the first 4 positions alone.
    masked = labels.clone()
    masked[:, 5:] = -100
    with torch.no_grad():
        part = model(ids, labels=masked)
    want = sum(torch.nn.functional.cross_entropy(out.logits[:, :4, a].flatten(0, 1),
                                                 labels[:, 1:5, 1 + a].reshape(-1))
               for a in range(6))
    torch.testing.assert_close(part.loss, want)
    # Feeding the GRU one id at a time (as a sampler does) gives the same logits.
    s = out.summary[0, 2:3]  # position 2 predicts token 3
    h, steps = None, []
    with torch.no_grad():
        for k in range(6):
            logits, h = model.decode(s, labels[0, 3:4, k:k + 1], h)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1)[0], out.logits[0, 2],
                               atol=1e-5, rtol=1e-5)
    # The first GRU input is sos_out (flat id 0), for every position.
    assert (labels[:, :, 0] == 0).all()


def test_backward_reaches_every_parameter() -> None:
    model = tiny_model().train()
    ids, labels = random_batch(model.config)
    model(ids, labels=labels).loss.backward()
    # supplementary_embedding row use depends on SOS/EOS presence; the batch has both.
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_random_init_lets_a_small_model_fit_one_batch() -> None:
    # From-scratch training depends on the init: with the reference's std 0.02 for every
    # linear layer this small width barely learns (measured here: 35.3 -> 18.7 nats/event
    # after 100 steps); with fan_in^-1/2 it memorises the batch (35.6 -> 0.39).
    torch.manual_seed(0)
    model = MoonbeamForCausalLM(MoonbeamConfig.tiny()).train()
    ids, labels = random_batch(model.config, B=4, L=34, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(101):
        loss = model(ids, labels=labels).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.1 * first, (first, loss.item())


def test_packed_attention_keeps_no_score_matrix() -> None:
    # The block-diagonal mask of packed crops goes to SDPA's fused kernels (CPU flash, CUDA
    # memory-efficient), which keep no per-head (L x L) softmax for backward, as the math
    # path would: only the mask itself, once per layer for all heads.
    model = tiny_model().train()
    c = model.config
    ids, _ = random_batch(c, B=2, L=256, seed=3)

    def kept(**kw) -> list[tuple[int, ...]]:
        shapes = []

        def keep(t: torch.Tensor) -> torch.Tensor:
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model.model(ids, **kw)
        return shapes

    packed = kept(attention_mask=(torch.arange(256) >= 100).long().expand(2, 256))
    causal = kept()
    assert (2, c.num_attention_heads, 256, 256) not in packed
    extra = [s for s in packed if s not in causal]
    assert extra == [(2, 1, 256, 256)] * c.num_hidden_layers, extra


# --- numerics of the reference (docs/moonbeam.md §3.7) ----------------------------------------
BF16 = torch.bfloat16


def long_onsets(c: MoonbeamConfig, B: int = 2, L: int = 12, seed: int = 0) -> torch.Tensor:
    """Event rows with absolute onsets past 256 (where bf16 drops an integer's last bits)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([
        3000 + torch.randint(0, 60, (B, L), generator=g).cumsum(1),
        torch.randint(1, c.dur_vocab_size - 2, (B, L), generator=g),
        torch.randint(0, 11, (B, L), generator=g),
        torch.randint(0, 12, (B, L), generator=g),
        torch.randint(0, 129, (B, L), generator=g),
        torch.randint(1, 128, (B, L), generator=g),
    ], dim=-1)


def written_out_fme(fme: FundamentalMusicEmbedding, x: torch.Tensor) -> torch.Tensor:
    """The reference's FME of a bf16 model, one step a line: (B, L) ints -> (B, L, d)."""
    d = fme.d
    rate = 1 / torch.pow(fme.base, (2 * (torch.arange(d) // 2)) / d)  # its fp32 table
    rate = rate.to(BF16)  # `angles.to(dtype=linear_fme.weight.dtype)`
    angle = x.to(BF16)[..., None] * rate  # the integer is cast to bf16 first: 1001 -> 1000
    assert angle.dtype == BF16
    pe = angle.clone()
    pe[..., 0::2] = torch.sin(angle[..., 0::2])  # bf16 in, bf16 out
    pe[..., 1::2] = torch.cos(angle[..., 1::2])
    pe = pe + fme.translation_bias.to(BF16)
    return F.linear(pe, fme.linear_fme.weight.to(BF16), fme.linear_fme.bias.to(BF16))


def written_out_attention(attn, h: torch.Tensor, positions: torch.Tensor, bases: tuple,
                          reference: bool) -> torch.Tensor:
    """One MRA attention on bf16 activations h (B, L, H) at positions (B, L, 6), causal:
    with the reference's bf16 rotary (bf16 `inv_freq`, fp32 product, bf16 cos/sin and
    rotation), or with fp32 tables and an fp32 rotation (reference=False)."""
    B, L, _ = h.shape
    hd = attn.head_dim
    q = F.linear(h, attn.q_proj.weight).view(B, L, 12, hd).transpose(1, 2)
    k = F.linear(h, attn.k_proj.weight).view(B, L, 6, hd).transpose(1, 2)
    v = F.linear(h, attn.v_proj.weight).view(B, L, 6, hd).transpose(1, 2)

    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        turned = torch.cat((-x[..., hd // 2:], x[..., :hd // 2]), dim=-1)
        return x * cos + turned * sin

    qs, ks = [], []
    for g, col in enumerate((0, 1, 2, 3, 0, 5)):
        if reference:  # the buffer is built in fp32, then `model.to(bfloat16)` rounds it
            inv_freq = 1.0 / (bases[g] ** (torch.arange(0, hd, 2, dtype=torch.int64).float()
                                           / hd))
            inv_freq = inv_freq.to(BF16).float()
        else:
            inv_freq = torch.tensor(bases[g], dtype=torch.float64).pow(
                -torch.arange(0, hd, 2, dtype=torch.float64) / hd).float()
        freqs = positions[..., col].float()[..., None] * inv_freq  # (B, L, hd/2), fp32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, hd)
        if reference:  # cos/sin cast to the activations' bf16, the rotation in bf16
            cos, sin = emb.cos().to(BF16), emb.sin().to(BF16)
            qs.append(rotate(q[:, 2 * g:2 * g + 2], cos, sin))
            ks.append(rotate(k[:, g:g + 1], cos, sin))
        else:
            cos, sin = emb.cos(), emb.sin()
            qs.append(rotate(q[:, 2 * g:2 * g + 2].float(), cos, sin).to(BF16))
            ks.append(rotate(k[:, g:g + 1].float(), cos, sin).to(BF16))
    q, k = torch.cat(qs, dim=1), torch.cat(ks, dim=1)
    y = F.scaled_dot_product_attention(q, k.repeat_interleave(2, dim=1),
                                       v.repeat_interleave(2, dim=1), is_causal=True)
    return F.linear(y.transpose(1, 2).reshape(B, L, -1), attn.o_proj.weight)


def test_reference_fme_is_the_written_out_reference_in_bf16() -> None:
    torch.manual_seed(0)
    x = torch.cat([torch.arange(0, 300), torch.randint(257, 5000, (200,)),
                   torch.tensor([1000, 1001])])[None]  # (1, 502)
    for base in (199999.0, 1031.0, 131.0):
        fme = FundamentalMusicEmbedding(16, base)
        with torch.no_grad():
            fme.translation_bias.normal_()
        want = written_out_fme(fme, x)
        bf16 = copy.deepcopy(fme).to(BF16)
        assert torch.equal(bf16(x, BF16), want)
        # Autocast to bf16 over fp32 weights (the trainer's bf16 on CUDA) computes the same.
        with torch.autocast("cpu", BF16):
            assert torch.equal(fme(x, BF16), want)
        # 1001 and 1000 are one bf16 number to the reference: both rows are the same.
        assert torch.equal(want[0, -1], want[0, -2])

        # The accurate path: the fp32 angles whatever the weights, rounded once at the end
        # (what a bf16 linear layer takes), and not what the reference computes.
        taken = linear_input(bf16, x)
        with torch.no_grad():
            exact = fme_encoding(x, 16, base) + bf16.translation_bias.float()
        assert taken.dtype == BF16 and torch.equal(taken, exact.to(BF16))
        assert not torch.equal(bf16(x)[0, 300:], want[0, 300:])  # onsets past 256


def linear_input(fme: FundamentalMusicEmbedding, x: torch.Tensor) -> torch.Tensor:
    """What the FME hands its `linear_fme` (the sinusoid plus the translation bias)."""
    seen = []
    hook = fme.linear_fme.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        fme(x)
    hook.remove()
    return seen[0]


def test_reference_dtype_is_the_dtype_the_model_runs_in() -> None:
    config = replace(MoonbeamConfig.tiny(), reference_numerics=True)
    model = MoonbeamForCausalLM(config).model
    assert model.reference_dtype() is None  # fp32: no 16-bit rounding to reproduce
    with torch.autocast("cpu", BF16):
        assert model.reference_dtype() == BF16
    assert copy.deepcopy(model).to(BF16).reference_dtype() == BF16
    plain = MoonbeamForCausalLM(MoonbeamConfig.tiny()).model.to(BF16)
    assert plain.reference_dtype() is None  # the flag off: the accurate angles in bf16 too


@pytest.mark.parametrize("reference", [True, False])
def test_bf16_attention_is_the_written_out_formulation(reference: bool) -> None:
    model = tiny_model()
    model.config.reference_numerics = reference
    model = model.to(BF16)
    c = model.config
    ids = long_onsets(c)
    attn = model.model.layers[0].self_attn
    seen = {}
    hooks = [attn.register_forward_pre_hook(lambda _, args: seen.__setitem__("h", args[0])),
             attn.register_forward_hook(lambda _, a, out: seen.__setitem__("y", out[0]))]
    with torch.no_grad():
        model.model(ids)
    for h in hooks:
        h.remove()
    want = written_out_attention(attn, seen["h"], ids, c.rope_bases, reference)
    assert seen["y"].dtype == BF16 and torch.equal(seen["y"], want)


def test_reference_numerics_change_bf16_and_nothing_in_fp32() -> None:
    ids, labels = random_batch(MoonbeamConfig.tiny(), L=12)
    ids[:, 1:-1, 0] += 2000  # onsets past 256
    out = {}
    for dtype in (torch.float32, BF16):
        for reference in (False, True):
            model = tiny_model()
            model.config.reference_numerics = reference
            with torch.no_grad():
                out[dtype, reference] = model.to(dtype)(ids, labels=labels)
    same = out[torch.float32, False], out[torch.float32, True]
    assert torch.equal(same[0].logits, same[1].logits) and torch.equal(same[0].loss, same[1].loss)
    assert not torch.equal(out[BF16, False].summary, out[BF16, True].summary)


def test_reference_numerics_is_saved_with_the_config() -> None:
    config = replace(MoonbeamConfig.tiny(), reference_numerics=True)
    assert MoonbeamConfig(**json.loads(json.dumps(config.to_dict()))).reference_numerics
    assert not MoonbeamConfig(**{k: v for k, v in config.to_dict().items()
                                 if k != "reference_numerics"}).reference_numerics
    with pytest.raises(ValueError, match="reference_numerics must be true or false"):
        replace(config, reference_numerics="yes")


def test_a_4bit_base_embeds_what_its_dequantized_weights_embed() -> None:
    # A 4-bit `linear_fme` holds uint8: its input must go in its compute dtype, not the
    # weight's (which turned the FME into integers under QLoRA).
    pytest.importorskip("bitsandbytes")
    from mehldau.adapters import qlora

    model = tiny_model()
    ref = qlora.nf4_round_trip(copy.deepcopy(model))
    qlora.quantize_4bit(model, torch.float32, "cpu")
    ids = long_onsets(model.config)
    with torch.no_grad():
        got, want = model.model.embed_tokens(ids), ref.model.embed_tokens(ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
