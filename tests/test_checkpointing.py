"""Activation checkpointing gives every model's loss and gradients of the plain path (fp32,
atol 1e-6; dropout on, as torch restores the RNG for the recomputation) while keeping fewer
activations, with LoRA and QLoRA too; micro-batches give the whole batch's step."""

from __future__ import annotations

import copy

import pytest
import torch
from test_moonbeam_model import random_batch

from mehldau.adapters import AdapterConfig, apply_lora
from mehldau.nn.checkpointing import set_activation_checkpointing
from mehldau.nn.dit import DiT, DiTConfig
from mehldau.nn.moonbeam import MoonbeamConfig, MoonbeamForCausalLM
from mehldau.nn.music_transformer import MusicTransformer, MusicTransformerConfig
from mehldau.nn.perceiver_ar import PerceiverAR, PerceiverARConfig
from mehldau.nn.vqvae import VQVAE, VQVAEConfig
from mehldau.train.trainer import TrainConfig, evaluate, fit, make_accelerator

ATOL = 1e-6
pytestmark = pytest.mark.usefixtures("one_thread")


def ids(vocab: int = 50, b: int = 3, t: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, vocab, (b, t), generator=g)
    return {"input_ids": x, "labels": torch.roll(x, -1, 1)}


def music_transformer() -> tuple[torch.nn.Module, dict]:
    cfg = MusicTransformerConfig(vocab_size=50, n_layers=3, d_model=32, n_heads=2, d_ff=64,
                                 max_seq_len=32, max_relative_position=16, dropout=0.1)
    return MusicTransformer(cfg), ids()


def perceiver() -> tuple[torch.nn.Module, dict]:
    cfg = PerceiverARConfig(vocab_size=50, n_layers=3, d_model=32, n_heads=2, d_ff=64,
                            max_seq_len=32, num_latents=12, max_relative_position=16,
                            dropout=0.1)
    return PerceiverAR(cfg), ids()


def moonbeam() -> tuple[torch.nn.Module, dict]:
    model = MoonbeamForCausalLM(MoonbeamConfig.tiny())
    x, labels = random_batch(model.config, B=2, L=9)
    return model, {"input_ids": x, "labels": labels}


def vqvae() -> tuple[torch.nn.Module, dict]:
    cfg = VQVAEConfig(channels=(16, 32), strides=((2, 2), (2, 2)), latent_channels=4,
                      codebook_size=64)
    g = torch.Generator().manual_seed(0)
    return VQVAE(cfg), {"x": (torch.rand(2, 2, 64, 88, generator=g) > 0.9).float()}


class _DiTLoss(torch.nn.Module):
    """DiT with a loss, so every model is checked through the same `.loss`."""

    def __init__(self) -> None:
        super().__init__()
        self.dit = DiT(DiTConfig(in_channels=4, patch_size=(2, 2), hidden_size=32, depth=3,
                                 num_heads=2, num_classes=3))

    def forward(self, x, t, y):
        return type("Out", (), {"loss": self.dit(x, t, y).pow(2).mean()})()


def dit() -> tuple[torch.nn.Module, dict]:
    g = torch.Generator().manual_seed(0)
    return _DiTLoss(), {"x": torch.randn(2, 4, 8, 12, generator=g),
                        "t": torch.tensor([3, 700]), "y": torch.tensor([0, 2])}


MODELS = {"music_transformer": music_transformer, "perceiver_ar": perceiver,
          "moonbeam": moonbeam, "vqvae": vqvae, "dit": dit}


def loss_and_grads(model: torch.nn.Module, batch: dict, checkpointed: bool):
    model = copy.deepcopy(model).train()  # the VQ-VAE's codebook moves on each forward
    assert set_activation_checkpointing(model, checkpointed) > 0
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(123)  # dropout, the VQ codebook init: the same draws on both paths
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpointed_equals_plain_and_keeps_less(name: str) -> None:
    torch.manual_seed(0)
    model, batch = MODELS[name]()
    loss, grads, kept = loss_and_grads(model, batch, checkpointed=False)
    loss_c, grads_c, kept_c = loss_and_grads(model, batch, checkpointed=True)
    torch.testing.assert_close(loss_c, loss, atol=ATOL, rtol=0)
    assert grads.keys() == grads_c.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], atol=ATOL, rtol=1e-5, msg=n)
    assert kept_c < 0.7 * kept, (kept_c, kept)  # activations recomputed, not stored


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_checkpointing_with_adapters(kind: str) -> None:
    torch.manual_seed(0)
    model, batch = music_transformer()
    if kind == "qlora":
        pytest.importorskip("bitsandbytes")
        from mehldau.adapters.qlora import quantize_4bit

        quantize_4bit(model, torch.float32, "cpu")
    adapted = apply_lora(model, AdapterConfig(kind=kind, dropout=0.1))
    loss, grads, _ = loss_and_grads(adapted, batch, checkpointed=False)
    loss_c, grads_c, _ = loss_and_grads(adapted, batch, checkpointed=True)
    torch.testing.assert_close(loss_c, loss, atol=ATOL, rtol=0)
    assert grads and all("lora_" in n for n in grads)  # the frozen base has none
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], atol=ATOL, rtol=1e-5, msg=n)


class _Windows(torch.utils.data.Dataset):
    """Fixed windows of uneven fill (padding unlabelled), so micro-batches hold different
    numbers of targets and an unweighted mean of their losses would be wrong."""

    def __init__(self) -> None:
        batch = ids(b=8, t=32, seed=5)
        self.x, self.y = batch["input_ids"], batch["labels"].clone()
        for i in range(8):
            self.y[i, 32 - 3 * i:] = -100

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i % 8], "labels": self.y[i % 8]}


@pytest.mark.parametrize("micro", [1, 3])
def test_micro_batches_take_the_whole_batch_s_step(micro: int, tmp_path) -> None:
    def trained(micro_batch_size: int | None, checkpointing: bool = False) -> dict:
        torch.manual_seed(0)
        model, _ = music_transformer()
        model.config.dropout = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        cfg = TrainConfig(max_steps=2, batch_size=8, warmup_steps=0, log_every=1,
                          eval_every=100, ckpt_every=100, micro_batch_size=micro_batch_size,
                          activation_checkpointing=checkpointing, mixed_precision="no")
        fit(model, _Windows(), None, cfg, tmp_path / f"run{micro_batch_size}{checkpointing}",
            {"branch": "production"})
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    whole = trained(None)
    for got in (trained(micro), trained(micro, checkpointing=True)):
        for n in whole:
            torch.testing.assert_close(got[n], whole[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("micro", [1, 3])
def test_evaluation_in_micro_batches_equals_the_whole_batch(micro: int) -> None:
    class Eight(_Windows):
        def __len__(self) -> int:
            return 16

    model, _ = music_transformer()
    accelerator = make_accelerator("no")  # as the trainer: one state per process
    whole = evaluate(model, Eight(), accelerator, batch_size=8)
    parts = evaluate(model, Eight(), accelerator, batch_size=8, micro_batch_size=micro)
    assert abs(parts - whole) < 1e-5 * whole
