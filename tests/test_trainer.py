"""Shared trainer pieces that the end-to-end tests do not pin down."""

from __future__ import annotations

import pytest
import torch

from mehldau.errors import UserError
from mehldau.train.trainer import TrainConfig, _schedule


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = _schedule(opt, TrainConfig(max_steps=20, warmup_steps=5, lr=1e-3, min_lr_ratio=0.1))
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    lrs.append(sched.get_last_lr()[0])
    assert lrs[0] < lrs[4] < lrs[5] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert lrs[-1] == pytest.approx(1e-4)


def test_train_config_rejects_non_positive_values() -> None:
    with pytest.raises(UserError, match="train.batch_size must be positive"):
        TrainConfig(batch_size=0)
    with pytest.raises(UserError, match="train.lr must be positive"):
        TrainConfig(lr=-1.0)


def test_a_checkpoint_cannot_choose_the_module_we_import(tmp_path) -> None:
    from mehldau.errors import UserError
    from mehldau.train.checkpoint import branch_recipe

    # the meta's "recipe" is never imported: only mehldau.branches.<known branch>.recipe
    recipe = branch_recipe(tmp_path, {"branch": "production", "recipe": "antigravity"})
    assert recipe.__name__ == "mehldau.branches.production.recipe"
    old = branch_recipe(tmp_path, {"branch": "scg_diffusion",
                                   "recipe": "branches.scg_diffusion.recipe"})  # older layout
    assert old.__name__ == "mehldau.branches.scg_diffusion.recipe"
    with pytest.raises(UserError, match="unknown branch 'os'"):
        branch_recipe(tmp_path, {"branch": "os", "recipe": "os"})
