"""The GPT-2 architecture: size, tying, attention paths, causality, padded vocab, init, KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_within, grad_tolerance, logits_tolerance, loss_tolerance

from pretrain.inference.cache import KVCache
from pretrain.model import GPT, GPTConfig


def _randomize(model: GPT, seed: int = 0, std: float = 0.1) -> GPT:
    """Random, non-trivial weights everywhere (LayerNorms included), not GPT-2's small init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def test_gpt2_preset_has_124_439_808_parameters_and_a_tied_head():
    with torch.device("meta"):  # the count and the tying do not need real memory
        model = GPT(GPTConfig.from_preset("gpt2"))
    assert model.config.vocab_size == 50257 and model.config.padded_vocab_size is None
    assert model.num_params() == 124_439_808
    assert model.lm_head.weight is model.transformer.wte.weight
    # Kaplan-style count without positions
    assert model.num_params(exclude_embeddings=True) == 124_439_808 - 1024 * 768


def test_tied_after_init_on_cpu_shares_storage():
    model = GPT(GPTConfig.from_preset("tiny"))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    model.init_weights(torch.Generator().manual_seed(1))
    assert model.lm_head.weight is model.transformer.wte.weight
    # state_dict shows both names (HF does too) but they are one tensor
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()


def test_untied_config_has_a_separate_head():
    model = GPT(GPTConfig.from_preset("tiny-vocab", tie_embeddings=False))
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.num_params() == GPT(GPTConfig.from_preset("tiny-vocab")).num_params() + 512 * 32


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(hs) + causal mask) v, spelled out. q, k, v: (B, nh, T, hs)."""
    T, hs = q.size(-2), q.size(-1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    att = att.masked_fill(~causal, float("-inf"))
    att = F.softmax(att, dim=-1)
    return att @ v  # (B, nh, T, hs)


def _reference_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
    """``F.scaled_dot_product_attention`` as the training forward calls it, by the textbook formula."""
    assert is_causal and attn_mask is None and dropout_p == 0.0 and not kw
    return reference_attention(q, k, v)


def test_sdpa_equals_reference_attention_fp32(monkeypatch):
    torch.manual_seed(0)
    model = _randomize(GPT(GPTConfig.from_preset("tiny"))).eval()
    # Each attention module, same input, both paths: within 1e-6.
    x = torch.randn(3, 40, 64)
    for block in model.transformer.h:
        with torch.no_grad():
            sdpa = block.attn(x)
            with monkeypatch.context() as m:
                m.setattr(F, "scaled_dot_product_attention", _reference_sdpa)
                ref = block.attn(x)
        assert (sdpa - ref).abs().max().item() < 1e-6
        assert ref.abs().max().item() > 0.5  # non-trivial outputs
    # End to end (two blocks and a 50257-wide head amplify fp32 rounding a little).
    idx = torch.randint(0, 50257, (3, 40))
    with torch.no_grad():
        sdpa_logits, _ = model(idx)
        with monkeypatch.context() as m:
            m.setattr(F, "scaled_dot_product_attention", _reference_sdpa)
            ref_logits, _ = model(idx)
    assert (sdpa_logits - ref_logits).abs().max().item() < 1e-5
    assert ref_logits.abs().max().item() > 1.0


def test_causality_later_tokens_never_change_earlier_logits():
    torch.manual_seed(0)
    model = _randomize(GPT(GPTConfig.from_preset("tiny"))).eval()
    idx = torch.randint(0, 50257, (2, 32))
    changed = idx.clone()
    changed[:, 20:] = (changed[:, 20:] + 12345) % 50257
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert (a[:, :20] - b[:, :20]).abs().max().item() <= 1e-6
    assert (a[:, 20:] - b[:, 20:]).abs().max().item() > 1e-2  # the change is visible from position 20 on


@pytest.mark.numerics
def test_padded_vocab_logits_are_minus_inf_and_never_win():
    torch.manual_seed(0)
    model = _randomize(GPT(GPTConfig.from_preset("tiny-vocab", padded_vocab_size=640))).eval()
    idx = torch.randint(0, 512, (2, 16))
    logits, loss = model(idx, targets=idx, return_logits=True)
    assert logits.shape == (2, 16, 640)
    assert torch.isneginf(logits[..., 512:]).all()
    assert torch.isfinite(logits[..., :512]).all()
    assert torch.isfinite(loss)
    assert logits.softmax(-1)[..., 512:].sum().item() == 0.0
    # The same model without padding gives the same real-vocab logits and loss.
    plain = GPT(GPTConfig.from_preset("tiny-vocab"))
    sd = {k: (v[:512] if k in ("transformer.wte.weight", "lm_head.weight") else v) for k, v in model.state_dict().items()}
    plain.load_state_dict(sd)
    logits2, loss2 = plain.eval()(idx, targets=idx, return_logits=True)
    # another head shape (512 vs 640 rows): another GEMM kernel, so within the derived tolerance
    assert_within(logits2, logits[..., :512], logits_tolerance(plain, idx), "logits")
    assert_within(loss2, loss, loss_tolerance(plain, idx, loss.item() * idx.numel(), idx.numel()) / idx.numel(), "loss")


def test_meta_device_init_then_to_empty_gives_minus_inf_padded_logits():
    # The FSDP2 path: build on meta, materialise with to_empty, then init_weights.
    cfg = GPTConfig.from_preset("tiny-vocab", padded_vocab_size=640)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight
    assert not list(model.buffers())  # no pad-mask buffer to rebuild: forward fills -inf itself
    model.init_weights()
    logits, _ = model(torch.zeros(1, 4, dtype=torch.long))
    assert torch.isneginf(logits[..., 512:]).all() and torch.isfinite(logits[..., :512]).all()


def test_init_statistics_and_scaled_residual_projections():
    cfg = GPTConfig(block_size=256, vocab_size=4096, n_layer=8, n_head=4, n_embd=256)
    model = GPT(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # 0.0035
    checked = 0
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.abs().max().item() == 0.0, name
            continue
        if ".ln_" in name or "ln_f" in name:
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        want = resid_std if name.endswith("c_proj.weight") else 0.02
        std = p.std().item()
        assert abs(std - want) / want < 0.03, f"{name}: std {std:.5f}, want {want:.5f}"
        assert abs(p.mean().item()) < 0.1 * want, name
        checked += 1
    assert checked == 2 + 4 * cfg.n_layer  # wte, wpe, and c_attn, c_proj, c_fc, c_proj per block


def test_init_weights_is_reproducible_with_a_generator():
    a, b = GPT(GPTConfig.from_preset("tiny")), GPT(GPTConfig.from_preset("tiny"))
    a.init_weights(torch.Generator().manual_seed(7))
    b.init_weights(torch.Generator().manual_seed(7))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.numerics
def test_kv_cache_chunked_forward_equals_full_forward():
    torch.manual_seed(0)
    model = _randomize(GPT(GPTConfig.from_preset("tiny"))).eval()
    idx = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache.empty(model.config, 2, 30, "cpu", torch.float32)
        parts = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in [(0, 11), (11, 12), (12, 25), (25, 30)]]
    assert cache.pos == 30
    assert_within(torch.cat(parts, dim=1), full, logits_tolerance(model, idx), "chunked vs full")


@pytest.mark.numerics
def test_the_model_attends_through_any_attention_cache():
    """The seam the caches live behind (pretrain.model.gpt.AttentionCache): one ``begin`` per call, one
    ``update`` per layer in order, attention over what ``update`` returns with ``step.mask``. A cache
    that keeps nothing (hands back the new keys, a causal mask) gives the plain forward's logits."""
    from pretrain.model.gpt import CacheStep

    calls = []

    class Passthrough:
        def begin(self, T, block_size):
            calls.append(("begin", T, block_size))
            return CacheStep(positions=0, mask=torch.ones(T, T, dtype=torch.bool).tril(), columns=0)

        def update(self, layer, k, v, step):
            calls.append(("update", layer))
            return k, v

    torch.manual_seed(0)
    model = _randomize(GPT(GPTConfig.from_preset("tiny"))).eval()
    idx = torch.randint(0, 50257, (2, 12))
    with torch.no_grad():
        got, _ = model(idx, kv_cache=Passthrough())
        want, _ = model(idx)
    assert calls == [("begin", 12, 64)] + [("update", i) for i in range(model.config.n_layer)]
    assert_within(got, want, logits_tolerance(model, idx), "through the seam vs plain")


def test_context_overflow_is_one_clear_error():
    model = GPT(GPTConfig.from_preset("tiny-vocab"))
    with pytest.raises(ValueError, match="block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = KVCache.empty(model.config, 1, 32, "cpu", torch.float32)
    model(torch.zeros(1, 30, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)


@pytest.mark.numerics
def test_loss_reductions_and_ignore_index():
    torch.manual_seed(0)
    model = _randomize(GPT(GPTConfig.from_preset("tiny-vocab"))).eval()
    idx = torch.randint(0, 512, (2, 8))
    targets = torch.randint(0, 512, (2, 8))
    targets[0, :3] = -100
    logits, mean = model(idx, targets, return_logits=True)
    _, total = model(idx, targets, reduction="sum")
    _, per_tok = model(idx, targets, reduction="none")
    assert per_tok.shape == (2, 8) and (per_tok[0, :3] == 0).all()
    tol = loss_tolerance(model, idx, total.item(), 13)  # the fused chunks vs the full logits
    assert_within(total / 13, mean, tol / 13, "sum / n vs mean")
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 512), targets.view(-1), ignore_index=-100)
    assert_within(mean, ref, tol / 13, "mean vs F.cross_entropy")
    # targets as a non-contiguous slice are accepted
    _, loss_t = model(idx, torch.randint(0, 512, (8, 2)).t())
    assert torch.isfinite(loss_t)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_embd": 30, "n_head": 4}, "divisible"),
        ({"padded_vocab_size": 100}, "padded_vocab_size"),
        ({"activation": "swish"}, "activation"),
        ({"n_layer": 0}, "n_layer"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig.from_preset("tiny-vocab", **overrides)
    with pytest.raises(ValueError, match="unknown model preset"):
        GPTConfig.from_preset("gpt5")


# ---------------------------------------------------------------------------------------------
# Research options (off by default; not GPT-2): rotary, QK-norm, ReLU², untied head


@pytest.mark.numerics
def test_rotary_replaces_learned_positions_and_depends_on_relative_position_only():
    from pretrain.model.gpt import apply_rotary

    model = GPT(GPTConfig.from_preset("tiny-vocab", rotary=True))
    assert "transformer.wpe.weight" not in model.state_dict()  # no learned positions
    base = GPT(GPTConfig.from_preset("tiny-vocab"))
    assert model.num_params() == base.num_params() - 32 * 32
    assert model.num_params(exclude_embeddings=True) == model.num_params()
    # q·k after rotation depends on the two positions only through their difference.
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    dots = [(apply_rotary(q, m, 1e4) * apply_rotary(k, n, 1e4)).sum().item() for m, n in [(5, 2), (9, 6), (30, 27)]]
    assert dots[0] == pytest.approx(dots[1], abs=1e-5) and dots[0] == pytest.approx(dots[2], abs=1e-5)
    assert dots[0] != pytest.approx((q * k).sum().item(), abs=1e-3)  # but it does rotate
    assert torch.equal(apply_rotary(q, 0, 1e4), q)  # position 0 is the identity
    # Causality still holds in the model (positions come only through the rotation).
    _randomize(model)
    idx = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        full = model(idx)[0]
        assert_within(model(idx[:, :12])[0], full[:, :12], logits_tolerance(model, idx[:, :12]), "prefix")


@pytest.mark.numerics
@pytest.mark.parametrize("flags", [{"rotary": True}, {"qk_norm": True}, {"rotary": True, "qk_norm": True}])
def test_research_attention_flags_keep_the_kv_cache_exact(flags):
    torch.manual_seed(0)
    model = _randomize(GPT(GPTConfig.from_preset("tiny", **flags))).eval()
    idx = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache.empty(model.config, 2, 30, "cpu", torch.float32)
        parts = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in [(0, 11), (11, 12), (12, 25), (25, 30)]]
    assert_within(torch.cat(parts, dim=1), full, logits_tolerance(model, idx), "chunked vs full")
    plain = _randomize(GPT(GPTConfig.from_preset("tiny"))).eval()
    if "rotary" in flags:  # same weights but wpe: different logits
        plain.load_state_dict(model.state_dict(), strict=False)
    else:
        plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (plain(idx)[0] - full).abs().max().item() > 1e-2  # the flag changes the computation


def test_qk_norm_makes_attention_invariant_to_the_scale_of_q_and_k():
    """QK-norm divides each head's q and k by their RMS: scaling the q/k projection changes
    nothing with it on, and changes the output with it off."""
    torch.manual_seed(0)
    x = torch.randn(2, 10, 64)
    outs = {}
    for on in (True, False):
        model = _randomize(GPT(GPTConfig.from_preset("tiny", qk_norm=on)), seed=1).eval()
        attn = model.transformer.h[0].attn
        with torch.no_grad():
            a = attn(x)
            attn.c_attn.weight[: 2 * 64] *= 3.0  # q and k rows (v untouched)
            attn.c_attn.bias[: 2 * 64] *= 3.0
            outs[on] = (a - attn(x)).abs().max().item()
    assert outs[True] < 1e-5 and outs[False] > 1e-3


def test_relu2_mlp_is_relu_squared():
    torch.manual_seed(0)
    model = _randomize(GPT(GPTConfig.from_preset("tiny", activation="relu2")))
    mlp, x = model.transformer.h[0].mlp, torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = mlp.c_proj(torch.relu(mlp.c_fc(x)) ** 2)
        assert torch.allclose(mlp(x), expected, atol=1e-6)
        assert not torch.allclose(mlp(x), mlp.c_proj(torch.relu(mlp.c_fc(x))), atol=1e-3)


def test_untied_head_learns_separately_from_the_embedding():
    model = GPT(GPTConfig.from_preset("tiny-vocab", tie_embeddings=False))
    idx = torch.randint(0, 512, (2, 16))
    model(idx, idx)[1].backward()
    # Only the tokens in idx get embedding gradient; the head gets gradient in every row.
    rows_wte = (model.transformer.wte.weight.grad.abs().sum(1) > 0).sum().item()
    rows_head = (model.lm_head.weight.grad.abs().sum(1) > 0).sum().item()
    assert rows_wte <= idx.unique().numel() < rows_head == 512


# The fused, chunked LM head + cross-entropy (GPT.loss_chunk_size; 0 = the full-logits path)


def _loss_and_grads(model: GPT, idx, targets, chunk: int, **kw):
    model.zero_grad(set_to_none=True)
    model.loss_chunk_size = chunk
    logits, loss = model(idx, targets, **kw)
    loss.backward()
    return logits, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.numerics
@pytest.mark.parametrize("chunk", [1, 7, 32, 1000])
def test_fused_loss_and_gradients_equal_the_full_logits_path(chunk):
    torch.manual_seed(0)
    model = _randomize(GPT(GPTConfig.from_preset("tiny-vocab", padded_vocab_size=640)))
    idx = torch.randint(0, 512, (3, 16))
    targets = torch.randint(0, 512, (3, 16))
    targets[0, :5] = -100
    targets[2, -1] = -100
    logits, ref, ref_g = _loss_and_grads(model, idx, targets, 0)
    assert logits is None  # targets given: no logits unless asked for, on either path
    none, got, got_g = _loss_and_grads(model, idx, targets, chunk)
    assert none is None
    n_tok = int((targets != -100).sum())
    assert_within(got, ref, loss_tolerance(model, idx, ref.item() * n_tok, n_tok) / n_tok, "loss")
    for n in ref_g:
        assert_within(got_g[n], ref_g[n], grad_tolerance(model.config, idx, ref_g[n]), n)
    assert (got_g["transformer.wte.weight"][512:] == 0).all()  # padded rows: sliced off, no gradient
    # accumulation scales the gradient as the unfused path does (a scalar times the loss)
    model.zero_grad(set_to_none=True)
    (model(idx, targets)[1] / 4).backward()
    g = ref_g["transformer.wte.weight"] / 4
    assert_within(model.lm_head.weight.grad, g, grad_tolerance(model.config, idx, g), "accumulated")


@pytest.mark.numerics
def test_fused_sum_and_none_reductions_without_grad_equal_the_full_path():
    torch.manual_seed(0)
    model = _randomize(GPT(GPTConfig.from_preset("tiny-vocab", padded_vocab_size=640))).eval()
    idx, targets = torch.randint(0, 512, (2, 12)), torch.randint(0, 512, (2, 12))
    targets[1, 3:] = -100
    with torch.no_grad():
        for reduction in ("sum", "none", "mean"):
            model.loss_chunk_size = 0
            ref = model(idx, targets, reduction=reduction)[1]
            model.loss_chunk_size = 5
            got = model(idx, targets, reduction=reduction)[1]
            assert got.shape == ref.shape, reduction
            # the chunked head vs the full logits: a sum of n_tok losses (one per token for 'none')
            n_tok = 1 if reduction == "none" else int((targets != -100).sum())
            total = ref.abs().max().item() * (n_tok if reduction == "mean" else 1)
            tol = loss_tolerance(model, idx, total, n_tok) / (n_tok if reduction == "mean" else 1)
            assert_within(got, ref, tol, reduction)
    # reduction='none' with a gradient takes the full path (correct, not memory-lean)
    model.loss_chunk_size = 5
    per_tok = model(idx, targets, reduction="none")[1]
    per_tok.sum().backward()
    assert model.lm_head.weight.grad is not None


def test_fused_loss_never_builds_a_rows_by_vocabulary_tensor():
    """Every tensor any op creates in forward + backward, recorded: none is as large as the
    (B*T, V) logits on the fused path; the full path does build them (so the probe bites)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny-vocab", padded_vocab_size=640))
    idx, targets = torch.randint(0, 512, (4, 32)), torch.randint(0, 512, (4, 32))
    sizes = {}
    for chunk in (0, 16):
        model.loss_chunk_size = chunk
        with Largest() as probe:
            model(idx, targets)[1].backward()
        sizes[chunk] = probe.numel
    assert sizes[0] >= 4 * 32 * 512
    assert sizes[16] <= 640 * 32  # the (V_rows, C) head gradient is the largest: one chunk's logits are 16 x 512


@pytest.mark.numerics
def test_fused_loss_compiles_without_graph_breaks_and_matches_eager():
    torch.manual_seed(0)
    model = _randomize(GPT(GPTConfig.from_preset("tiny-vocab", padded_vocab_size=640)))
    idx, targets = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    targets[0, :4] = -100
    _, ref, ref_g = _loss_and_grads(model, idx, targets, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    compiled.zero_grad(set_to_none=True)
    _, loss = compiled(idx, targets)
    loss.backward()
    n_tok = int((targets != -100).sum())  # aot_eager may fuse/reorder: the derived tolerance
    assert_within(loss, ref, loss_tolerance(model, idx, ref.item() * n_tok, n_tok) / n_tok, "loss")
    for n, p in model.named_parameters():
        assert_within(p.grad, ref_g[n], grad_tolerance(model.config, idx, ref_g[n]), n)


def test_fused_loss_under_bf16_autocast_matches_the_full_path():
    torch.manual_seed(0)
    model = _randomize(GPT(GPTConfig.from_preset("tiny-vocab", padded_vocab_size=640)), std=0.05)
    idx, targets = torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, ref, ref_g = _loss_and_grads(model, idx, targets, 0)
        _, got, got_g = _loss_and_grads(model, idx, targets, 8)
    assert got.dtype == torch.float32  # the log-sum-exp in fp32, as the full path's .float()
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    for n in ref_g:  # bf16 matmuls; the fused head accumulates its weight gradient in fp32
        assert got_g[n].dtype == ref_g[n].dtype == torch.float32
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=0.05, atol=2e-3, msg=n)


def test_fp8_head_matches_the_bf16_head_within_fp8_precision():
    """pretrain.model.head.fp8_linear (the GPU check's training lever): e4m3 operands, e5m2 output
    gradient, dynamic per-tensor scales -- the output and both gradients point where the exact ones
    do (cosine > 0.99, relative error within a few FP8 steps); a GPT with head_fp8 gives a loss within
    1% of the exact head's, through torch.compile (aot_eager), and evaluation keeps the exact head."""
    from pretrain.model.head import fp8_linear

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(96, 64, generator=g) * 3).requires_grad_()
    w = (torch.randn(80, 64, generator=g) * 0.02).requires_grad_()
    out = fp8_linear(x, w)
    up = torch.randn(96, 80, generator=g)
    (out.float() * up).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = x2 @ w2.t()
    (ref * up).sum().backward()
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0)  # noqa: E731
    for got, want in [(out, ref), (x.grad, x2.grad), (w.grad, w2.grad)]:
        assert got.shape == want.shape and torch.isfinite(got).all()
        assert cos(got, want) > 0.99
        assert ((got.float() - want).norm() / want.norm()) < 0.15  # e4m3: 3 mantissa bits; e5m2: 2
    assert out.dtype == torch.bfloat16 and w.grad.dtype == torch.float32

    model = GPT(GPTConfig.from_preset("tiny-vocab", padded_vocab_size=640))
    idx = torch.randint(0, 512, (4, 32), generator=g)
    exact = model(idx, idx)[1]
    compiled = torch.compile(model, backend="aot_eager")  # the full-logits path, where FP8 applies
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = compiled(idx, idx)[1].item()
        model.head_fp8 = True
        loss = compiled(idx, idx)[1]
    loss.backward()
    assert loss.item() != bf16 and abs(loss.item() - exact.item()) / exact.item() < 0.01
    assert torch.isfinite(model.transformer.wte.weight.grad).all() and model.transformer.wte.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], GPT.logits(model, model.hidden_states(idx)))
        model.head_fp8 = False
        assert torch.equal(model(idx)[0], model.logits(model.hidden_states(idx)))
