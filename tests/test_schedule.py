"""LR schedules: the onecycle schedule matches torch's OneCycleLR; cosine warms up and decays."""

import pytest
import torch

from nanomoe.training.config import TrainConfig
from nanomoe.training.schedule import lr_and_beta1


@pytest.mark.parametrize("total_steps, pct_start", [(100, 0.3), (37, 0.25), (10, 0.5)])
def test_onecycle_matches_torch_onecyclelr(total_steps, pct_start):
    cfg = TrainConfig(schedule="onecycle", lr=1e-3, pct_start=pct_start)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct_start)
    for step in range(total_steps):
        lr, beta1 = lr_and_beta1(cfg, step, total_steps)
        assert lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        assert beta1 == pytest.approx(opt.param_groups[0]["betas"][0], rel=1e-9)
        opt.step()
        sched.step()


def test_cosine_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(schedule="cosine", lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_and_beta1(cfg, s, 110)[0] for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_and_beta1(cfg, 110, 110)[0] == pytest.approx(0.1)
    assert lr_and_beta1(cfg, 5, 110)[1] == cfg.beta1


def test_constant_is_constant():
    cfg = TrainConfig(schedule="constant", lr=0.5)
    assert {lr_and_beta1(cfg, s, 50)[0] for s in range(50)} == {0.5}


def test_wsd_warms_up_holds_the_peak_then_decays_linearly_to_min_lr():
    cfg = TrainConfig(schedule="wsd", lr=1.0, warmup_steps=10, decay_frac=0.2, min_lr_ratio=0.1)
    lrs = [lr_and_beta1(cfg, s, 100)[0] for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert set(lrs[10:80]) == {1.0}  # stable until the last 20 steps
    decay = lrs[80:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert max(steps) == pytest.approx(min(steps))  # linear
    assert lrs[-1] == pytest.approx(0.1)  # the last step trains at lr * min_lr_ratio
