"""The LR schedule (a pure function of the step), parameter groups, clipping."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import OptimSection
from pretrain.model import GPT, GPTConfig
from pretrain.schedule import lr_at
from pretrain.training.optim import build_optimizer, clip_grad_norm, param_groups, set_lr


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
    opt = build_optimizer(model, OptimSection(lr=1e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1),
                          torch.device("cpu"))
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


def test_wsd_schedule_stable_then_linear_or_1_sqrt_cooldown():
    kw = dict(max_lr=1.0, warmup_steps=10, max_steps=100, min_lr_ratio=0.0, name="wsd", cooldown_frac=0.2)
    assert lr_at(0, **kw) == pytest.approx(0.1)  # the same warmup as cosine
    assert [lr_at(s, **kw) for s in (9, 10, 50, 79, 80)] == [1.0] * 5  # stable up to the cool-down
    assert lr_at(90, **kw, cooldown="linear") == pytest.approx(0.5)  # half-way down
    assert lr_at(90, **kw, cooldown="1-sqrt") == pytest.approx(1 - math.sqrt(0.5))
    assert lr_at(85, **kw, cooldown="1-sqrt") < lr_at(85, **kw, cooldown="linear")  # 1-sqrt drops faster
    assert lr_at(99, **kw) == pytest.approx(0.05) and lr_at(100, **kw) == 0.0 and lr_at(10**6, **kw) == 0.0
    floor = dict(kw, min_lr_ratio=0.1)
    assert lr_at(90, **floor) == pytest.approx(0.1 + 0.5 * 0.9) and lr_at(100, **floor) == pytest.approx(0.1)
    for shape in ("linear", "1-sqrt"):
        lrs = [lr_at(s, **kw, cooldown=shape) for s in range(110)]
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises after the warmup
    with pytest.raises(ValueError, match="schedule.name"):
        lr_at(50, 1.0, 10, 100, 0.0, name="linear")


def test_batch_warmup_grows_in_multiples_of_the_start():
    from pretrain.schedule import batch_tokens_at, tokens_before

    bs = [batch_tokens_at(s, 2048, 512, 6) for s in range(9)]
    assert bs == [512, 512, 1024, 1024, 1536, 1536, 2048, 2048, 2048]
    assert all(b % 512 == 0 for b in bs) and bs == sorted(bs)
    assert [batch_tokens_at(s, 2048, 0, 0) for s in range(3)] == [2048] * 3  # off
    assert tokens_before(9, 2048, 512, 6) == sum(bs)
    assert tokens_before(4, 2048, 512, 6) == sum(bs[:4])
    assert tokens_before(100, 2048, 0, 0) == 100 * 2048


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    from pretrain.training.optim import Optimizers

    model = GPT(GPTConfig.from_preset("tiny-vocab"))
    section = OptimSection(lr=3e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, name="muon", muon_lr=0.02,
                           muon_momentum=0.95, muon_nesterov=True, muon_ns_steps=5, muon_weight_decay=0.0,
                           muon_adjust_lr="original")
    opt = build_optimizer(model, section, torch.device("cpu"))
    assert isinstance(opt, Optimizers) and isinstance(opt.optimizers["muon"], torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    assert muon == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= adamw
    assert not muon & adamw and len(muon) + len(adamw) == len(names)  # every parameter once
    # One schedule: the Muon group follows optim.lr's value scaled by muon_lr / lr.
    set_lr(opt, 1.5e-3)
    assert opt.optimizers["muon"].param_groups[0]["lr"] == pytest.approx(0.01)
    assert all(g["lr"] == 1.5e-3 for g in opt.optimizers["adamw"].param_groups)
    # A step moves every parameter; the state round-trips through state_dict.
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(0, 512, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    sd = opt.state_dict()
    assert set(sd) == {"muon", "adamw"} and sd["muon"]["state"]
    opt2 = build_optimizer(model, OptimSection(lr=3e-3, name="muon", muon_lr=0.02), torch.device("cpu"))
    opt2.load_state_dict(sd)
    for k, v in opt2.optimizers["muon"].state_dict()["state"].items():
        assert torch.equal(v["momentum_buffer"], sd["muon"]["state"][k]["momentum_buffer"])
    with pytest.raises(ValueError, match="optimizer state holds"):
        opt2.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_muon_fp32_path_is_torch_muon_step_for_step():
    """pretrain.training.optim.Muon's own step, run in bf16, equals torch.optim.Muon's bit for bit (so the
    fp32 path is the same algorithm in another dtype); fp32 stays within bf16's rounding of it."""
    from pretrain.training.optim import Muon

    torch.manual_seed(0)
    ws = [torch.randn(48, 16), torch.randn(16, 40)]  # tall and wide
    grads = [[torch.randn_like(w) for w in ws] for _ in range(3)]
    kw = dict(lr=0.02, weight_decay=0.01, momentum=0.95)
    runs = {}
    for name, make in (
        ("torch", lambda ps: torch.optim.Muon(ps, **kw)),
        ("ours-bf16", lambda ps: _ForcedManual(ps, ns_dtype=torch.bfloat16, **kw)),
        ("ours-fp32", lambda ps: Muon(ps, ns_dtype=torch.float32, **kw)),
        ("ours-match", lambda ps: _ForcedManual(ps, ns_dtype=torch.bfloat16, adjust_lr_fn="match_rms_adamw", **kw)),
        ("torch-match", lambda ps: torch.optim.Muon(ps, adjust_lr_fn="match_rms_adamw", **kw)),
    ):
        ps = [torch.nn.Parameter(w.clone()) for w in ws]
        opt = make(ps)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        runs[name] = ps
    for a, b in zip(runs["torch"], runs["ours-bf16"]):
        assert torch.equal(a, b)
    for a, b in zip(runs["torch-match"], runs["ours-match"]):
        assert torch.equal(a, b)
    for a, b in zip(runs["torch"], runs["ours-fp32"]):
        assert not torch.equal(a, b) and (a - b).abs().max() < 0.02 * 3 * 0.05


class _ForcedManual:
    """pretrain.training.optim.Muon with its own step forced (even in bf16), for the comparison above."""

    def __new__(cls, params, ns_dtype, **kw):
        from pretrain.training.optim import Muon

        opt = Muon(params, ns_dtype=torch.float32, **kw)
        opt.ns_dtype = ns_dtype
        opt.step = lambda: Muon.step(opt, closure=lambda: None)  # a closure takes the manual path
        return opt
