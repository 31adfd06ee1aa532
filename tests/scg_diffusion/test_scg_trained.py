"""SCG against unguided sampling with the same seeds, on a tiny model trained here."""

from __future__ import annotations

import pytest
import torch
from conftest import scale_notes, write_midi

from mehldau.data.dataset import Augmentation
from mehldau.data.rolls import RollCropDataset
from mehldau.guidance.rules import extract_targets, rule_losses, rule_scales, weighted_loss
from mehldau.guidance.stochastic_control_guidance import SCGConfig, scg_sample
from mehldau.nn.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from mehldau.nn.vqvae import VQVAE, VQVAEConfig
from mehldau.tokenize.pianoroll import PianoRollTokenizer, roll_to_tensor

pytestmark = pytest.mark.usefixtures("one_thread")
AE = dict(channels=(8, 16), strides=((2, 2), (2, 2)), latent_channels=4, codebook_size=32)
FRAMES = 128


def _train(model: torch.nn.Module, data: RollCropDataset, steps: int, lr: float) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        x = torch.stack([data[8 * i + j]["x"] for j in range(8)])
        model(x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread) -> tuple[LatentDiffusion, list]:
    """A VQ-VAE (40 steps) and a DiT (80 steps) on four toy pieces, and their rolls."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("scg")
    tok = PianoRollTokenizer()
    # Pieces of different densities, so the model has a range of densities to choose from.
    rolls = [tok.encode_file(write_midi(tmp / f"p{k}.mid",
                                        scale_notes(48, base=50 + 3 * k, step=0.1 + 0.1 * k,
                                                    seed=k)))
             for k in range(4)]
    data = RollCropDataset(rolls, FRAMES, tok, seed=0, augment=Augmentation(2))
    ae = VQVAE(VQVAEConfig(**AE))
    _train(ae, data, 40, 3e-3)
    dcfg = LatentDiffusionConfig(autoencoder=VQVAEConfig(**AE).to_dict(), frames=FRAMES,
                                 dit=dict(patch_size=(2, 2), hidden_size=64, depth=2,
                                          num_heads=4))
    model = LatentDiffusion(dcfg)
    model.autoencoder.load_state_dict(ae.state_dict())
    with torch.no_grad():
        z = model.encode(torch.stack([data[i]["x"] for i in range(64)]))
    model.config.latent_scale = 1.0 / float(z.std())
    _train(model, data, 80, 2e-3)
    return model, rolls


def test_scg_lowers_the_rule_loss_of_a_trained_model(trained) -> None:
    model, rolls = trained
    dcfg = model.config
    # Target: the densest piece's note density; the rule is what SCG sees, nothing else.
    target = extract_targets(roll_to_tensor(rolls[0][:FRAMES]), ["note_density"])

    def loss(rolls: torch.Tensor) -> torch.Tensor:
        return rule_losses(rolls, target)["note_density"]

    shape = (8, *dcfg.latent_shape())
    results = {}
    for n in (None, 8):
        gen = torch.Generator().manual_seed(0)
        z = scg_sample(model.dit, model.decode, None if n is None else loss, model.schedule,
                       shape, 20, SCGConfig(candidates=n or 1, t_start=999), gen)
        results[n] = loss(model.decode(z))  # (8,)
    plain, guided = results[None].mean().item(), results[8].mean().item()
    # Measured (seed 0, default roll repairs): unguided 26.9, guided (n = 8) 4.5 over the 8
    # samples (82.7 vs 9.0 without the repairs). The test asks for half.
    assert guided < 0.5 * plain, (guided, plain)


def test_every_selected_rule_steers_once_normalised(trained) -> None:
    """All three rules at once, each divided by its unguided mean (`rule_scales`): every one
    must come out lower than unguided sampling with the same seed, over 8 samples."""
    model, rolls = trained
    dcfg = model.config
    names = ["pitch_histogram", "note_density", "chord"]
    targets = extract_targets(roll_to_tensor(rolls[2][:FRAMES]), names, window=32)
    shape = (8, *dcfg.latent_shape())

    def draw(loss_fn):
        z = scg_sample(model.dit, model.decode, loss_fn, model.schedule, shape, 20,
                       SCGConfig(candidates=8, t_start=999), torch.Generator().manual_seed(0))
        return rule_losses(model.decode(z), targets, window=32)

    unguided = draw(None)
    scales = rule_scales(unguided)
    guided = draw(lambda r: weighted_loss(rule_losses(r, targets, window=32), {}, scales))
    # Measured (seed 0), guided / unguided: pitch histogram 0.728, note density 0.243, chord
    # 0.863. Without the default roll repairs density losses are in the hundreds and, raw,
    # decide every choice: pitch histogram 1.026, chord 0.994 (scaled: 0.877, 0.771). The
    # test asks for 5 % below unguided on each rule.
    for name in names:
        g, u = guided[name].mean().item(), unguided[name].mean().item()
        assert g < 0.95 * u, (name, g, u)
