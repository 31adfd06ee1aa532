"""LoRA / QLoRA wrappers (mehldau.adapters) on tiny Music Transformers: fast, fp32, seeded."""

from __future__ import annotations

import builtins
import copy
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mehldau.adapters.lora import (
    ADAPTER_DIR,
    EMBEDDINGS,
    FFN,
    AdapterConfig,
    apply_lora,
    load_adapter,
    merge,
    read_base_pointer,
    save_adapter,
    trainable_parameters,
)
from mehldau.errors import UserError
from mehldau.nn.moonbeam import MoonbeamConfig, MoonbeamForCausalLM
from mehldau.nn.music_transformer import MusicTransformer, MusicTransformerConfig
from mehldau.train.memory import lora_parameters

WEIGHTS = "model.safetensors"


def tiny_config(d_model: int = 32) -> MusicTransformerConfig:
    return MusicTransformerConfig(vocab_size=40, n_layers=2, d_model=d_model, n_heads=4,
                                  d_ff=2 * d_model, max_seq_len=64, max_relative_position=16,
                                  dropout=0.0)


def tiny_model(seed: int = 0, d_model: int = 32) -> MusicTransformer:
    torch.manual_seed(seed)
    return MusicTransformer(tiny_config(d_model))


# bitsandbytes' CPU repacking (the bug below) needs in_features a multiple of its 64-value
# blocks, so the 4-bit tests use a 64-wide model: the smallest that can show the bug.
Q_WIDTH = 64


def batch(seed: int = 1, b: int = 2, t: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (b, t + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def lora_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def train_steps(model: torch.nn.Module, n: int, lr: float = 1e-2, everything: bool = False
                ) -> None:
    """n AdamW steps on the trainable parameters (or on all: frozen ones get no gradient)."""
    params = [p for p in model.parameters() if everything or p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for i in range(n):
        x, y = batch(seed=10 + i)
        model(x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x).logits


# ----------------------------------------------------------------------------------------------
# LoRA


def test_lora_trains_only_the_adapter() -> None:
    model = apply_lora(tiny_model(), AdapterConfig(dropout=0.0))
    lora = lora_params(model)
    assert lora, "no LoRA parameters were created"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in lora}
    # the frozen base includes the relative tables, embeddings, norms and the output head
    for part in ("rel_emb", "embed_tokens", "ln_1", "norm.weight", "lm_head"):
        assert any(part in n for n in base_before), part
    b_before = {n: p.detach().clone() for n, p in lora.items() if "lora_B" in n}
    assert all(torch.count_nonzero(b) == 0 for b in b_before.values())  # peft's init

    train_steps(model, 1, everything=True)  # frozen weights given to AdamW too

    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), f"frozen parameter {n} changed"
    assert any(not torch.equal(lora[n], b) for n, b in b_before.items()), "no LoRA B moved"


def test_trainable_share_of_the_base_preset(capsys) -> None:
    with torch.device("meta"):
        model = apply_lora(MusicTransformer(MusicTransformerConfig()), AdapterConfig())
    trainable, total = trainable_parameters(model)
    # q/k/v/o of 6 layers, r=8, d=512: 6 * 4 * 8 * (512 + 512)
    assert trainable == 6 * 4 * 8 * (512 + 512)
    share = trainable / total
    with capsys.disabled():
        print(f"\nbase preset, LoRA q/k/v/o r=8: {trainable:,} / {total:,} trainable "
              f"= {100 * share:.3f} %")
    assert share < 0.02


def test_ffn_and_embedding_targets_are_wrapped() -> None:
    cfg = AdapterConfig(ffn=True, embeddings=True, dropout=0.0)
    names = cfg.target_modules(tiny_model())
    assert names[:4] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    # the Llama names this model has (gate_proj only comes with SwiGLU), each once
    assert names[4:] == [*FFN[1:], *EMBEDDINGS]
    model = apply_lora(tiny_model(), cfg)
    # gate_proj does not exist with GELU (only SwiGLU); every present target must be wrapped
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj",
                       "embed_tokens", "lm_head"}
    lora = lora_params(model)
    assert any("embed_tokens.lora_embedding_A" in n for n in lora)
    assert any("lm_head.lora_A" in n for n in lora)
    assert any("up_proj.lora_A" in n for n in lora)
    torch.manual_seed(0)
    swiglu = MusicTransformer(MusicTransformerConfig(**{**tiny_config().to_dict(),
                                                        "activation": "swiglu"}))
    swiglu = apply_lora(swiglu, cfg)
    assert any(n.endswith("gate_proj") and hasattr(m, "lora_A")
               for n, m in swiglu.named_modules())


def wrapped(model: torch.nn.Module) -> set[str]:
    """Dotted names (peft's prefix removed) of the modules peft gave a LoRA update."""
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if hasattr(m, "lora_A") and (m.lora_A or m.lora_embedding_A)}


@pytest.mark.parametrize("family", ["production", "moonbeam"])
def test_a_target_that_is_no_module_is_refused_naming_the_valid_ones(family: str) -> None:
    model = tiny_model() if family == "production" else MoonbeamForCausalLM(
        MoonbeamConfig.tiny())
    for typo in ("q_prj", "mlp", "norm", "0"):  # a typo, a block, a norm, a bare index
        with pytest.raises(UserError) as e:
            apply_lora(model, AdapterConfig(targets=["q_proj", typo]))
        msg = str(e.value)
        assert "\n" not in msg and f"'{typo}' is not a module of {type(model).__name__}" in msg
        valid = msg.split("choose from ")[1].split(", ")
        assert valid == sorted(valid) and {"q_proj", "lm_head"} <= set(valid)
        assert "norm" not in valid and "0" not in valid
    if family == "moonbeam":  # a Sequential's layers by their parent, as peft can match them
        assert {"supplementary_MLP.0", "supplementary_MLP.2", "linear_fme"} <= set(valid)
        apply_lora(model, AdapterConfig(targets=["supplementary_MLP.0"]))


def test_embeddings_on_moonbeam_adapt_its_compound_embedding() -> None:
    # Moonbeam has no `embed_tokens`: its input is the FMEs, the instrument and SOS/EOS tables
    # and the embedding MLP (docs/moonbeam.md §3.2); its output side is adapted by default.
    default = adapter_defaults()
    config = MoonbeamConfig.tiny()
    plain = apply_lora(MoonbeamForCausalLM(config), AdapterConfig(**default))
    acfg = AdapterConfig(**default, embeddings=True, ffn=True)
    more = apply_lora(MoonbeamForCausalLM(config), acfg)
    assert trainable_parameters(more)[0] > trainable_parameters(plain)[0]
    # the memory plan counts what peft adds, dotted targets (supplementary_MLP.0) included
    model = MoonbeamForCausalLM(config)
    assert lora_parameters(model, acfg.target_modules(model), acfg.r) == \
        trainable_parameters(more)[0]
    layers = [f"model.layers.{i}." for i in range(config.num_hidden_layers)]
    head = {"decoder_embedding", "summary_projection", "lm_head", "decoder.fc_out"}
    assert wrapped(plain) == head | {f"{p}self_attn.{n}" for p in layers
                                     for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert wrapped(more) - wrapped(plain) == {
        *(f"model.{a}_embedding.linear_fme" for a in ("onset", "dur", "octave", "pitch",
                                                      "velocity")),
        "model.instrument_embedding.embedding", "model.supplementary_embedding",
        "model.supplementary_MLP.0", "model.supplementary_MLP.2",
        *(f"{p}mlp.{n}" for p in layers for n in ("gate_proj", "up_proj", "down_proj"))}
    # The LoRA updates start at zero: the adapted model computes what the base does.
    torch.manual_seed(0)
    base = MoonbeamForCausalLM(config).eval()
    x = torch.randint(0, 30, (1, 6, 6))
    adapted = apply_lora(copy.deepcopy(base), AdapterConfig(**default, embeddings=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(x).summary, base(x).summary, rtol=0, atol=0)


def adapter_defaults() -> dict:
    """The moonbeam_lora branch's adapter defaults (configs/branch/moonbeam_lora.yaml)."""
    from omegaconf import OmegaConf

    branch = OmegaConf.load(Path(__file__).parents[1] / "configs/branch/moonbeam_lora.yaml")
    return OmegaConf.to_container(branch.adapter)


def test_merge_gives_a_plain_model_with_the_adapted_logits() -> None:
    model = apply_lora(tiny_model(), AdapterConfig(dropout=0.0))
    train_steps(model, 3)
    assert any(torch.count_nonzero(p) for n, p in lora_params(model).items() if "lora_B" in n)
    x, _ = batch(seed=99)
    adapted = logits(model, x)
    base_only = logits(tiny_model(), x)
    assert not torch.allclose(adapted, base_only, atol=1e-4)  # the adapter does something

    merged = merge(model)
    assert type(merged) is MusicTransformer
    assert not any("lora" in n for n, _ in merged.named_modules())
    assert not any("lora" in n for n in merged.state_dict())
    assert all(type(m).__module__.startswith(("torch.", "mehldau."))
               for m in merged.modules())
    torch.testing.assert_close(logits(merged, x), adapted, atol=1e-5, rtol=0)


def test_save_load_round_trip_and_base_pointer(tmp_path: Path, capsys) -> None:
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    save_file(tiny_model().state_dict(), str(base_dir / WEIGHTS))
    # r=2: at width 32 the default r=8 would be a quarter of each adapted matrix
    model = apply_lora(tiny_model(), AdapterConfig(r=2, dropout=0.0))
    train_steps(model, 2)
    x, _ = batch(seed=99)
    expected = logits(model, x)

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_adapter(model, ckpt, base_dir, WEIGHTS)
    weights = ckpt / ADAPTER_DIR / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)  # no frozen base weight saved
    assert len(keys) == 2 * 4 * 2  # layers x q/k/v/o x (A, B)
    adapter_bytes = sum(f.stat().st_size for f in (ckpt / ADAPTER_DIR).iterdir())
    base_bytes = (base_dir / WEIGHTS).stat().st_size
    assert weights.stat().st_size < base_bytes / 10, (weights.stat().st_size, base_bytes)
    assert adapter_bytes < base_bytes / 4, (adapter_bytes, base_bytes)  # with config, README

    assert read_base_pointer(ckpt, WEIGHTS) == base_dir.resolve()
    fresh = tiny_model(seed=123)  # other weights, then the base loaded from disk
    fresh.load_state_dict(load_file(str(base_dir / WEIGHTS)))
    loaded = load_adapter(fresh, ckpt)
    torch.testing.assert_close(logits(loaded, x), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # trainable=False
    assert all(p.requires_grad == ("lora_" in n) for n, p in
               load_adapter(tiny_model(), ckpt, trainable=True).named_parameters())

    # the base changes on disk: refused, unless forced (with a warning)
    save_file(tiny_model(seed=7).state_dict(), str(base_dir / WEIGHTS))
    capsys.readouterr()
    with pytest.raises(UserError, match="force=true"):
        read_base_pointer(ckpt, WEIGHTS)
    assert read_base_pointer(ckpt, WEIGHTS, force=True) == base_dir.resolve()
    err = capsys.readouterr().err
    assert "WARNING" in err and "changed" in err
    # and an adapter whose base is gone, or a folder that is not an adapter checkpoint
    (base_dir / WEIGHTS).unlink()
    with pytest.raises(UserError, match="is gone"):
        read_base_pointer(ckpt, WEIGHTS, force=True)
    with pytest.raises(UserError, match="not an adapter checkpoint"):
        read_base_pointer(tmp_path, WEIGHTS)


def test_bad_adapter_configs() -> None:
    with pytest.raises(UserError, match="unknown adapter 'dora'"):
        AdapterConfig(kind="dora")
    with pytest.raises(UserError, match="r > 0"):
        AdapterConfig(r=0)
    with pytest.raises(UserError):
        AdapterConfig(dropout=1.0)


# ----------------------------------------------------------------------------------------------
# QLoRA (bitsandbytes on CPU)


def _bnb():
    return pytest.importorskip("bitsandbytes")


def test_qlora_forward_equals_the_dequantized_reference() -> None:
    _bnb()
    from mehldau.adapters.qlora import dequantized_copy, quantize_4bit

    x, _ = batch(seed=99)
    full = logits(tiny_model(d_model=Q_WIDTH), x)
    model = quantize_4bit(tiny_model(d_model=Q_WIDTH), torch.float32, "cpu")
    n4 = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert n4 == 2 * 6  # q, k, v, o, up, down per layer; lm_head kept in full precision
    assert type(model.lm_head) is torch.nn.Linear
    assert not any(p.requires_grad for p in model.parameters())
    ref = dequantized_copy(model)
    assert not any(type(m).__name__ == "Linear4bit" for m in ref.modules())
    q = logits(model, x)
    torch.testing.assert_close(q, logits(ref, x), atol=1e-5, rtol=1e-5)
    # NF4 error (about 10 % per weight): visible, but small next to the logits themselves
    rel = ((q - full).norm() / full.norm()).item()
    assert 1e-3 < rel < 0.3, rel


def test_nf4_round_trip_computes_what_the_4bit_model_computes() -> None:
    # generate and merge of a QLoRA run load its adapter onto these plain weights
    _bnb()
    from mehldau.adapters.qlora import nf4_round_trip, quantize_4bit

    x, _ = batch(seed=5)
    quantized = logits(quantize_4bit(tiny_model(d_model=Q_WIDTH), torch.float32, "cpu"), x)
    plain = nf4_round_trip(tiny_model(d_model=Q_WIDTH))
    assert not any(type(m).__name__ == "Linear4bit" for m in plain.modules())
    torch.testing.assert_close(logits(plain, x), quantized, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(tiny_model(d_model=Q_WIDTH), x), quantized, atol=1e-3)
    assert torch.equal(plain.lm_head.weight, tiny_model(d_model=Q_WIDTH).lm_head.weight)


def _qlora_and_reference(repack: bool):
    """A QLoRA model trained one step (B != 0), then eval no-grad pass, then a train backward;
    and the same LoRA weights on the dequantized base. Returns both models after backward."""
    bnb = _bnb()
    from mehldau.adapters.qlora import dequantized_copy, quantize_4bit

    base = quantize_4bit(tiny_model(d_model=Q_WIDTH), torch.float32, "cpu")
    if repack:  # undo the workaround: bitsandbytes' own default on an avx512_bf16 CPU
        for m in base.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True
    ref_base = dequantized_copy(base)  # before any repacking
    cfg = AdapterConfig(kind="qlora", dropout=0.0)
    model = apply_lora(base, cfg)
    train_steps(model, 1)
    lora = lora_params(model)
    assert any(torch.count_nonzero(p) for n, p in lora.items() if "lora_B" in n)

    x, y = batch(seed=5)
    model.eval()
    with torch.no_grad():
        model(x)  # a validation pass: the trigger for the repacking
    model.train()
    model(x, labels=y).loss.backward()

    ref = apply_lora(ref_base, cfg)
    ref_lora = lora_params(ref)
    assert set(ref_lora) == set(lora)
    with torch.no_grad():
        for n, p in lora.items():
            ref_lora[n].copy_(p)
    ref.train()
    ref(x, labels=y).loss.backward()
    return lora, ref_lora


def test_qlora_gradients_survive_an_eval_pass() -> None:
    lora, ref_lora = _qlora_and_reference(repack=False)
    layer0 = [n for n in lora if ".layers.0." in n]
    assert layer0
    for n in layer0:
        g = lora[n].grad
        assert g is not None and torch.count_nonzero(g) > 0, n
    for n, p in lora.items():
        torch.testing.assert_close(p.grad, ref_lora[n].grad, rtol=1e-4, atol=1e-7, msg=n)


def _has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512_bf16(),
                    reason="bitsandbytes only repacks 4-bit weights on CPUs with avx512_bf16")
def test_without_the_workaround_the_eval_pass_breaks_gradients() -> None:
    # Shows that the test above would catch the bitsandbytes CPU bug.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "an autograd kernel was not registered"
        lora, ref_lora = _qlora_and_reference(repack=True)
    broken = [n for n in lora if ".layers.0." in n and (
        lora[n].grad is None
        or not torch.allclose(lora[n].grad, ref_lora[n].grad, rtol=1e-4, atol=1e-7))]
    assert broken, "the eval pass no longer breaks 4-bit gradients: is the workaround needed?"


def test_missing_bitsandbytes_is_a_one_line_user_error(monkeypatch) -> None:
    from mehldau.adapters.qlora import import_bnb, quantize_4bit

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError) as e:
        import_bnb()
    msg = str(e.value)
    assert "adapter=qlora needs bitsandbytes" in msg and "adapter=lora" in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="adapter=lora"):
        quantize_4bit(tiny_model(), torch.float32, "cpu")

    # a broken native library: often a multi-line error, still one line here
    monkeypatch.delitem(sys.modules, "bitsandbytes")
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise OSError("libbitsandbytes_cpu.so: cannot open shared object file\n"
                          "(more diagnostics on further lines)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(UserError) as e:
        import_bnb()
    msg = str(e.value)
    assert "cannot open shared object file" in msg and "adapter=lora" in msg
    assert "\n" not in msg, msg
