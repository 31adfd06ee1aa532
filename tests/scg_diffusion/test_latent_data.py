"""Roll and latent datasets of the diffusion branch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mehldau.data.dataset import Augmentation
from mehldau.data.rolls import (
    LatentCropDataset,
    RollCropDataset,
    RollWindowDataset,
    encode_rolls,
)
from mehldau.nn.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from mehldau.nn.vqvae import VQVAE, VQVAEConfig
from mehldau.tokenize.pianoroll import PianoRollTokenizer, clean_rolls, render, roll_to_tensor

pytestmark = pytest.mark.usefixtures("one_thread")
AE = dict(channels=(4, 8), strides=((2, 2), (2, 2)), codebook_size=16)


def roll(frames: int, notes_from: int, notes_to: int) -> np.ndarray:
    """Back-to-back quarter-second notes on a rising line between two frames, else silence."""
    s = np.arange(notes_from, notes_to, 25)
    return render(s, s + 25, 40 + (s // 25) % 30, np.full(len(s), 90), frames)


def test_encoding_whole_rolls_equals_encoding_their_chunks() -> None:
    torch.manual_seed(0)
    ae = VQVAE(VQVAEConfig(**AE)).eval()
    r = roll(300, 100, 300)  # 300 frames: chunks of 128, the last padded
    (z, active), = encode_rolls(ae.encode, [r], chunk=128, time_factor=4)
    assert z.shape == (4, 75, 24)
    chunks = [np.pad(r, ((0, 384 - 300), (0, 0), (0, 0)))[i:i + 128] for i in (0, 128, 256)]
    want = torch.cat([ae.encode(roll_to_tensor(c)[None])[0] for c in chunks], 1)[:, :75]
    torch.testing.assert_close(z, want)
    # Activity: latent rows of 4 frames with a sounding note (silence before frame 100).
    assert not active[:25].any() and active[25:].all()


def test_transposed_encodings_come_from_transposed_rolls() -> None:
    ae = VQVAE(VQVAEConfig(**AE)).eval()
    tok = PianoRollTokenizer()
    r = roll(128, 0, 128)
    out = encode_rolls(ae.encode, [r], 128, 4, transpositions=(-2, 0, 2), tokenizer=tok)
    assert len(out) == 3
    up = ae.encode(roll_to_tensor(tok.augment(r, transpose=2))[None])[0]
    torch.testing.assert_close(out[2][0], up)
    assert not torch.equal(out[0][0], out[1][0])


def test_encoding_holds_one_batch_of_rolls_at_a_time_and_keeps_their_order() -> None:
    # The split and its transposed copies were once all held at once before encoding.
    import weakref

    ae = VQVAE(VQVAEConfig(**AE)).eval()
    tok = PianoRollTokenizer()
    made: list[weakref.ref] = []
    most = 0

    class Spy(PianoRollTokenizer):
        def augment(self, r, **k):  # every transposed copy, watched
            out = tok.augment(r, **k)
            made.append(weakref.ref(out))
            return out

    def encode(x: torch.Tensor) -> torch.Tensor:
        nonlocal most
        most = max(most, sum(ref() is not None for ref in made))
        return ae.encode(x)

    rolls = [roll(200, 0, 200 - 10 * i) for i in range(12)]  # two chunks of 128 each
    out = encode_rolls(encode, rolls, 128, 4, (-1, 0, 1), Spy(), batch_size=4)
    assert 0 < most <= 4  # a batch of 4 chunks spans at most 3 rolls, 2 of them copies
    each = [z for r in rolls for z, _ in encode_rolls(ae.encode, [r], 128, 4, (-1, 0, 1), tok)]
    assert len(out) == 36
    for (z, _), want in zip(out, each):
        torch.testing.assert_close(z, want)


def test_latent_crops_avoid_silence_and_are_reproducible() -> None:
    z = torch.arange(2 * 100 * 3, dtype=torch.float32).view(2, 100, 3)
    active = np.zeros(100, bool)
    active[50:] = True  # only the second half sounds
    ds = LatentCropDataset([(z, active)], rows=16, seed=1)
    for i in range(20):
        crop = ds[i]["z"]
        first = int(crop[0, 0, 0]) // 3  # the row it starts at
        assert first + 16 > 50
        torch.testing.assert_close(crop, z[:, first:first + 16])
        torch.testing.assert_close(ds[i]["z"], crop)  # item i depends only on (seed, i)
    short = LatentCropDataset([(z[:, :10], np.ones(10, bool))], rows=16)[0]["z"]
    assert (short[:, 10:] == 0).all()  # shorter than a crop: silence after it
    with pytest.raises(ValueError):
        LatentCropDataset([(z, np.zeros(100, bool))], rows=16)


def test_roll_datasets_drop_silent_windows_and_crops() -> None:
    tok = PianoRollTokenizer()
    r = roll(1000, 600, 1000)
    windows = RollWindowDataset([r], 200)
    assert len(windows) == 2 and windows[0]["x"].shape == (2, 200, 88)
    crops = RollCropDataset([r], 200, tok, seed=0, augment=Augmentation(2, (0.9, 1.1)))
    for i in range(10):
        x = crops[i]["x"]
        assert x.shape == (2, 200, 88) and x[0].sum() > 0


def test_latent_diffusion_loss_from_rolls_equals_loss_from_their_latents() -> None:
    torch.manual_seed(0)
    cfg = LatentDiffusionConfig(autoencoder=AE, frames=64,
                                dit=dict(patch_size=(2, 2), hidden_size=32, depth=1,
                                         num_heads=2), latent_scale=1.7)
    model = LatentDiffusion(cfg).train()
    assert not model.autoencoder.training  # frozen and in eval mode even in train()
    x = roll_to_tensor(roll(64, 0, 64))[None].repeat(2, 1, 1, 1)
    t, noise = torch.tensor([10, 900]), torch.randn(2, *cfg.latent_shape())
    a = model(x=x, t=t, noise=noise).loss
    b = model(z=model.encode(x), t=t, noise=noise).loss
    torch.testing.assert_close(a, b)
    assert all(not p.requires_grad for p in model.autoencoder.parameters())
    # The floor silences faint cells in both channels.
    rolls = model.decode(torch.randn(2, *cfg.latent_shape()))
    assert ((rolls[:, 0] > 0) | (rolls[:, 1] == 0)).all()
    assert (rolls[:, 0][rolls[:, 0] > 0] >= cfg.velocity_floor).all()
    # The roll repairs of the config run after the floor, in decode, where rules see them.
    z = torch.randn(2, *cfg.latent_shape())
    model.config.max_gap_frames, model.config.min_note_frames = 3, 4
    torch.testing.assert_close(model.decode(z), clean_rolls(_floored(model, z), 3, 0, 4))
    with pytest.raises(ValueError, match="min_note_frames"):
        LatentDiffusionConfig(autoencoder=AE, frames=64, dit=cfg.dit, min_note_frames=0)


def _floored(model: LatentDiffusion, z: torch.Tensor) -> torch.Tensor:
    rolls = model.autoencoder.decode(z / model.config.latent_scale)
    return rolls * (rolls[:, :1] >= model.config.velocity_floor)
