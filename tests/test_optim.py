"""The LR schedule (a pure function of the step), parameter groups, clipping."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.model import GPT, GPTConfig
from pretrain.optim import build_optimizer, clip_grad_norm, lr_at, param_groups


def test_schedule_warmup_cosine_floor():
    kw = dict(max_lr=6e-4, warmup_steps=715, max_steps=19073, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(6e-4 / 715)  # never 0 at step 0
    assert lr_at(357, **kw) == pytest.approx(6e-4 * 358 / 715)
    assert lr_at(714, **kw) == pytest.approx(6e-4)  # warmup ends at the peak
    assert lr_at(715, **kw) == pytest.approx(6e-4)  # the cosine starts at the peak
    mid = 715 + (19073 - 715) // 2
    assert lr_at(mid, **kw) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5), rel=1e-3)
    assert lr_at(19072, **kw) == pytest.approx(6e-5, rel=1e-3)
    assert lr_at(19073, **kw) == pytest.approx(6e-5)
    assert lr_at(50_000, **kw) == pytest.approx(6e-5)
    lrs = [lr_at(s, **kw) for s in range(0, 19073, 50)]
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))  # rises ...
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))  # ... then falls
    # Pure: the same step always gives the same value, whatever came before.
    assert lr_at(1000, **kw) == lr_at(1000, **kw)
    assert lr_at(5, 1.0, 0, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_param_groups_decay_2d_only_and_tied_once():
    model = GPT(GPTConfig.from_preset("tiny-vocab"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids))  # the tied wte / lm_head weight appears once
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()
    assert any(p is model.lm_head.weight for p in decay["params"])
    opt = build_optimizer(model, 1e-3, [0.9, 0.95], 1e-8, 0.1, None, torch.device("cpu"))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["fused"]  # CPU has a fused AdamW too


@pytest.mark.parametrize("max_norm", [0.0, 0.01, 100.0])
def test_clip_matches_torch(max_norm):
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
    norm = clip_grad_norm(a, max_norm)
    ref = torch.nn.utils.clip_grad_norm_(b, max_norm if max_norm > 0 else float("inf"))
    torch.testing.assert_close(norm, ref)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)
