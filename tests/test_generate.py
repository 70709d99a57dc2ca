"""Generation: KV cache == no cache, seeded sampling, top-k/top-p support, EOT, context, CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from numerics import divergences

from pretrain.inference.generate import (
    EOT_ID,
    GenerationError,
    build_parser,
    filter_logits,
    generate,
    main,
    sample_next,
)
from pretrain.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]


def _model(std: float = 0.3, **overrides) -> GPT:
    """A tiny model with large random weights, so next-token distributions are peaked (greedy
    has clear winners) but not degenerate."""
    model = GPT(GPTConfig.from_preset("tiny", **overrides))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif ".ln_" in name or "ln_f" in name:
                p.copy_(1.0 + std * noise)
            else:
                p.copy_(std * noise)
    return model.eval()


PROMPTS = [[464, 2068, 7586, 21831], [15496, 995, 11, 314], [40, 1101, 257, 1263]]


def same_except_near_ties(model, prompts, got, want, seed=None, **kw) -> int:
    """Two generation paths agree as ``generate`` promises (tests/numerics.py ``divergences``): each
    row's tokens equal, except rows that part at a near-tie of the exact logits -- counted, and
    fewer than all rows (a path that differed everywhere would not be the same computation)."""
    seeds = None if seed is None else [seed + i for i in range(len(prompts))]
    parted = divergences(model, prompts, got, want, seeds, **kw)
    assert parted < len(prompts) or len(prompts) == 1, f"{parted} of {len(prompts)} rows parted (each at a near-tie)"
    return parted


@pytest.mark.numerics
def test_kv_cache_greedy_equals_no_cache_greedy():
    model = _model()
    cached = generate(model, PROMPTS, max_new_tokens=30, temperature=0, eot_id=None)
    recomputed = generate(model, PROMPTS, max_new_tokens=30, temperature=0, eot_id=None, use_kv_cache=False)
    same_except_near_ties(model, PROMPTS, cached, recomputed, temperature=0)
    assert all(len(c) == 30 for c in cached)
    assert len({tuple(c) for c in cached}) == 3  # the rows really differ
    # and greedy is the argmax of a plain forward pass, step by step (another path: near-ties apart)
    steps = []
    seq = torch.tensor(PROMPTS[:1])
    for _ in range(5):
        with torch.no_grad():
            logits, _ = model(seq)
        steps.append(logits[0, -1].argmax().item())
        seq = torch.cat([seq, torch.tensor([[steps[-1]]])], dim=1)
    same_except_near_ties(model, PROMPTS[:1], [cached[0][:5]], [steps], temperature=0)


@pytest.mark.numerics
def test_kv_cache_sampling_equals_no_cache_sampling_with_the_same_seed():
    model = _model()
    a = generate(model, PROMPTS, max_new_tokens=20, temperature=1.0, top_k=50, seed=5, eot_id=None)
    b = generate(model, PROMPTS, max_new_tokens=20, temperature=1.0, top_k=50, seed=5, eot_id=None, use_kv_cache=False)
    same_except_near_ties(model, PROMPTS, a, b, seed=5, temperature=1.0, top_k=50)


def test_seeded_sampling_is_reproducible_and_the_seed_matters():
    model = _model()
    kw = dict(max_new_tokens=12, temperature=1.2, top_p=0.95, eot_id=None)
    a = generate(model, [PROMPTS[0]] * 4, seed=1, **kw)
    assert a == generate(model, [PROMPTS[0]] * 4, seed=1, **kw)
    assert a != generate(model, [PROMPTS[0]] * 4, seed=2, **kw)
    assert len({tuple(r) for r in a}) > 1  # samples of one batch differ from each other


@pytest.mark.numerics
def test_ragged_prompts_are_batched_by_length_and_keep_their_order():
    model = _model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11], [12]]
    batched = generate(model, prompts, max_new_tokens=8, temperature=0, eot_id=None)
    one_by_one = [generate(model, [p], max_new_tokens=8, temperature=0, eot_id=None)[0] for p in prompts]
    same_except_near_ties(model, prompts, batched, one_by_one, temperature=0)
    # a (B, T) tensor works too (the same rows, kernels and shapes as the list: bitwise)
    assert generate(model, torch.tensor(PROMPTS), max_new_tokens=4, temperature=0) == generate(
        model, PROMPTS, max_new_tokens=4, temperature=0
    )


def test_top_k_restricts_the_support():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    kept = torch.isfinite(filter_logits(logits, top_k=7))
    assert (kept.sum(-1) == 7).all()
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(7).indices, True))
    g = torch.Generator().manual_seed(0)
    allowed = logits.topk(7).indices
    for _ in range(50):
        tok = sample_next(logits, temperature=2.0, top_k=7, generator=g)
        assert all(tok[i] in allowed[i] for i in range(4))
    # top_k=1 is greedy (the screen keeps 2 candidates instead of 1: another matmul shape)
    model = _model()
    top1 = generate(model, PROMPTS, 10, temperature=1.0, top_k=1, seed=0)
    same_except_near_ties(model, PROMPTS, top1, generate(model, PROMPTS, 10, temperature=0), temperature=0)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]])
    logits = probs.log()
    support = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].nonzero().flatten().tolist()  # noqa: E731
    assert support(0.4) == [0]
    assert support(0.7) == [0, 1]
    assert support(0.85) == [0, 1, 2]
    assert support(0.95) == [0, 1, 2, 3]
    assert support(1.0) == [0, 1, 2, 3, 4]
    shuffled = logits[:, [3, 0, 4, 2, 1]]  # order in the vocabulary does not matter
    assert torch.isfinite(filter_logits(shuffled, top_p=0.7))[0].nonzero().flatten().tolist() == [1, 4]
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, temperature=1.0, top_p=0.7, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}


def test_draw_follows_the_distribution_and_never_picks_a_zero_probability_token():
    from pretrain.inference.generate import draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.15, 0.05, 0.0], [0.0] * 6 + [1.0]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(2, 7)
    for _ in range(n // 1000):
        toks = draw(probs.repeat_interleave(1000, 0), g).view(2, 1000)  # (2, 1000)
        counts += torch.nn.functional.one_hot(toks, 7).sum(1)
    assert counts[1, 6] == n and (counts[:, [0, 2]] == 0).all() and counts[0, 6] == 0
    freq = counts[0] / n  # binomial std <= 0.0036 per entry: 5 sigma is 0.018
    assert (freq - probs[0]).abs().max() < 0.018, freq


def test_padded_vocab_ids_are_never_generated():
    model = _model(padded_vocab_size=50304)
    out = generate(model, PROMPTS, max_new_tokens=20, temperature=3.0, seed=0, eot_id=None)
    assert all(0 <= t < 50257 for row in out for t in row)


def test_generation_stops_at_end_of_text():
    model = _model()
    with torch.no_grad():
        # Make <|endoftext|> the clear argmax everywhere: ln_f outputs a multiple of its embedding.
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(10 * model.transformer.wte.weight[EOT_ID])
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=0) == [[], [], []]
    assert generate(model, PROMPTS, max_new_tokens=10, temperature=0, eot_id=None) == [[EOT_ID] * 10] * 3


def test_context_limits():
    model = _model()  # block_size 64
    with pytest.raises(GenerationError, match=r"prompt 2 has 65 tokens but the model's context is 64"):
        generate(model, [[1] * 10, [1] * 65], max_new_tokens=5)
    for use_kv_cache in (True, False):
        out = generate(model, [[1] * 60], max_new_tokens=20, temperature=0, eot_id=None, use_kv_cache=use_kv_cache)
        assert len(out[0]) == 4  # prompt + continuation fill the context exactly
        assert generate(model, [[1] * 64], max_new_tokens=5, use_kv_cache=use_kv_cache) == [[]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        generate(_model(), PROMPTS, **{"max_new_tokens": 3, **kwargs})


def test_bad_prompts():
    model = _model()
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(model, [[]], max_new_tokens=3)
    with pytest.raises(GenerationError, match=r"outside \[0, 50257\)"):
        generate(model, [[50257]], max_new_tokens=3)


def test_generation_under_autocast_matches_without_cache():
    # The trainer samples inside its bf16 autocast context.
    model = _model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = generate(model, PROMPTS, max_new_tokens=8, temperature=0, eot_id=None)
        recomputed = generate(model, PROMPTS, max_new_tokens=8, temperature=0, eot_id=None, use_kv_cache=False)
    assert cached == recomputed and all(len(c) == 8 for c in cached)


def test_generate_restores_training_mode():
    model = _model().train()
    generate(model, PROMPTS, max_new_tokens=2)
    assert model.training


# ---------------------------------------------------------------------------------------------
# CLI


def test_help_lists_every_option_with_its_default():
    text = " ".join(build_parser().format_help().split())  # undo line wrapping
    for option, default in [
        ("--max-new-tokens", "100"),
        ("--temperature", "1.0"),
        ("--top-k", "None"),
        ("--top-p", "None"),
        ("--seed", "1337"),
        ("--num-samples", "1"),
        ("--device", "auto"),
        ("--dtype", "float32"),
        ("--prompt", "''"),
    ]:
        assert option in text
        assert f"(default: {default}" in text, option
    # what a batched row promises against the row alone: --help, README and DESIGN say the same
    from pretrain.inference.generate import GUARANTEE

    assert GUARANTEE in text
    for doc in ("README.md", "docs/DESIGN.md"):
        assert "near-tie" in (ROOT / doc).read_text(), doc
    for option in ("--model", "--no-kv-cache"):
        assert option in text


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("safetensors")
    from pretrain.model.hf import export_hf

    out = tmp_path_factory.mktemp("gen") / "model"
    export_hf(_model(), out)
    return out


def test_cli_generates_and_reports_tokens_per_second(exported, capsys):
    rc = main(["--model", str(exported), "--prompt", "Hello world", "--max-new-tokens", "6", "--temperature", "0"])
    assert rc == 0
    out, err = capsys.readouterr()
    assert out.startswith("Hello world")
    assert "tokens/s" in err and "KV cache" in err
    rc = main(["--model", str(exported), "--prompt", "Hi", "--max-new-tokens", "4", "--num-samples", "3", "--top-k", "5"])
    out, _ = capsys.readouterr()
    assert rc == 0 and out.count("--- sample ") == 3


def test_cli_greedy_is_the_same_with_and_without_cache(exported, capsys):
    args = ["--model", str(exported), "--prompt", "The quick brown fox", "--max-new-tokens", "12", "--temperature", "0"]
    main(args)
    with_cache = capsys.readouterr().out
    main([*args, "--no-kv-cache"])
    assert capsys.readouterr().out == with_cache


def test_cli_prompt_longer_than_context_is_one_line_exit_2(exported):
    r = subprocess.run(
        [sys.executable, "-m", "pretrain.inference.generate", "--model", str(exported), "--prompt", " ".join(["word"] * 100)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert "prompt 1 has 100 tokens but the model's context is 64 (block_size); shorten the prompt" in r.stderr


def test_cli_bad_model_is_one_line_exit_2(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2-generate: error: ") and err.count("\n") == 1


def test_top_k_on_the_candidates_draws_what_the_full_row_draws():
    """On a CPU, top-k sampling works on the k candidates alone (pretrain.inference.generate._sample_top_k):
    with the same generator it picks the token the full-row path (mask, softmax over V, draw)
    picks, with and without top-p; rows with ties at the k-th value go to the full path."""
    from pretrain.inference.generate import _sample_top_k, draw

    logits = torch.randn(400, 1000, generator=torch.Generator().manual_seed(1)) * 3  # (B, V)
    for top_p in (None, 0.8):
        fast = _sample_top_k(logits, 50, top_p, torch.Generator().manual_seed(2))
        full = draw(filter_logits(logits, 50, top_p).softmax(-1), torch.Generator().manual_seed(2))
        assert fast is not None and (fast == full).float().mean() > 0.99, (fast != full).sum()
        kth = logits.topk(50).values[:, -1:]
        assert (logits.gather(1, fast[:, None]) >= kth).all()
    tied = torch.zeros(2, 100)
    tied[:, :10] = 1.0  # 10 tokens tie for the top: top-k 5 keeps all 10
    assert _sample_top_k(tied, 5, None, None) is None
    picks = torch.stack([sample_next(tied, top_k=5, generator=torch.Generator().manual_seed(s)) for s in range(200)])
    assert picks.max() < 10 and len(picks.unique()) > 5  # the tied 10, not just the first 5


def test_generate_leaves_the_weights_exactly_as_they_were():
    """generate() gives the CPU model's Linear weights a column-major copy while it decodes
    (pretrain.inference.generate.decode_layout) and each parameter its very tensor back afterwards: same
    storage, strides and version, so an optimizer, DDP's bucket views or a compiled graph holding
    them see nothing. Also when generation fails half-way."""
    model = _model()

    def state():
        return [(n, p.data_ptr(), p.stride(), p._version) for n, p in model.named_parameters()]

    before = state()
    generate(model, PROMPTS, max_new_tokens=5, seed=0, top_k=5)
    assert state() == before
    from pretrain.inference import generate as gen_mod

    real = gen_mod.sample_next
    try:
        gen_mod.sample_next = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            generate(model, PROMPTS, max_new_tokens=5, seed=0)
    finally:
        gen_mod.sample_next = real
    assert state() == before


def _screen_cases():
    """(name, model) pairs whose LM heads stress the int8 screen differently: GPT-2's init (small
    logits, many near the k-th), the tests' peaked model, rows with one large outlier each (coarse
    int8 steps for the rest of the row), all-zero rows and duplicated rows (exact ties)."""
    gpt2_init = GPT(GPTConfig.from_preset("tiny")).eval()
    outliers = _model()
    with torch.no_grad():
        W = outliers.lm_head.weight
        W[torch.arange(W.size(0)), torch.randint(0, W.size(1), (W.size(0),), generator=torch.Generator().manual_seed(3))] *= 40
        W[100:200] = 0
        W[300:400] = W[200:300]
    return [("gpt2-init", gpt2_init), ("peaked", _model()), ("outliers-zeros-duplicates", outliers)]



def _check_screen(screen, model, name: str, rows: int, g: torch.Generator, at_most=None) -> None:
    """For hidden states of ``rows`` rows at three scales: every approximate logit within the
    screen's bound of the exact one, and for n = 1, 2, 51, 300 the (sorted) candidates holding each
    row's exact top n with its ties, with their fp32 logits; on GPT-2 init (n <= 51) under 5% of the
    vocabulary and, given ``at_most`` (another screen), no more candidates than it keeps."""
    W = model.lm_head.weight[: model.config.vocab_size].detach()  # (V, C)
    for scale in (0.3, 1.0, 8.0):
        h = F.layer_norm(torch.randn(rows, W.size(1), generator=g), (W.size(1),)) * scale  # (B, C)
        exact = h @ W.t()  # (B, V)
        a = screen.approximate(h)
        assert ((a - exact).abs() <= screen.bound(h, a)).all(), (name, scale)
        for n in (1, 2, 51, 300):
            cand, r = screen.top(h, n)
            assert torch.equal(cand, cand.sort().values)
            torch.testing.assert_close(r, exact[:, cand], rtol=1e-5, atol=1e-5)
            nth = exact.topk(n, dim=-1).values[:, -1:]  # (B, 1)
            must = (exact >= nth).any(dim=0).nonzero().squeeze(1)  # the top n of each row and its ties
            assert torch.isin(must, cand).all(), (name, scale, n)
            if name == "gpt2-init" and n <= 51:
                if at_most is not None:
                    assert cand.numel() <= at_most.top(h, n)[0].numel(), (scale, n)
                assert cand.numel() < model.config.vocab_size // 20, (scale, n, cand.numel())

def test_screened_head_bound_holds_and_its_top_n_is_the_exact_top_n():
    """pretrain.inference.generate.ScreenedHead: for every token the int8 screen's logit is within the
    derived bound of the fp32 logit, and the candidates it keeps hold every token of the exact
    top n (ties with the n-th included), with their fp32 logits -- while being a small fraction
    of the vocabulary."""
    from pretrain.inference.generate import ScreenedHead

    g = torch.Generator().manual_seed(7)
    for name, model in _screen_cases():
        screen = ScreenedHead.build(model)
        assert screen is not None, name
        _check_screen(screen, model, name, rows=3, g=g)


@pytest.mark.numerics
def test_screened_sampling_draws_what_the_full_head_draws(monkeypatch):
    """Top-k sampling and greedy decoding on a CPU go through the screen; with the same seed they
    give the tokens the fp32 head over the whole vocabulary gives."""
    from pretrain.inference import generate as gen_mod

    for name, model in _screen_cases():
        settings = [dict(temperature=0), dict(temperature=0.8, top_k=50), dict(temperature=1.0, top_k=5, top_p=0.9)]
        for kw in settings:
            screened = generate(model, PROMPTS, max_new_tokens=24, seed=3, eot_id=None, **kw)
            with monkeypatch.context() as m:
                m.setattr(gen_mod.ScreenedHead, "build", classmethod(lambda cls, model: None))
                full = generate(model, PROMPTS, max_new_tokens=24, seed=3, eot_id=None, **kw)
            assert same_except_near_ties(model, PROMPTS, screened, full, seed=3, **kw) < len(PROMPTS), name


def test_batch_screen_bound_holds_and_its_top_n_is_the_exact_top_n():
    """pretrain.inference.decode.BatchScreenedHead (several rows: the head in bf16 through oneDNN): the
    same checks as for the int8 screen, for 8 rows at once -- every token within the bound, the union
    of the rows' candidates holding each row's exact top n and ties, with their fp32 logits -- and
    fewer candidates than the int8 screen keeps for the same rows (its bound is tighter)."""
    from pretrain.inference.decode import BatchScreenedHead, ScreenedHead

    g = torch.Generator().manual_seed(8)
    for name, model in _screen_cases():
        screen = BatchScreenedHead.build(model)
        if screen is None:
            pytest.skip("this torch has no oneDNN bf16 kernels")
        _check_screen(screen, model, name, rows=8, g=g, at_most=ScreenedHead.build(model))


def test_batches_decode_through_onednn_and_leave_the_modules_as_they_were(monkeypatch):
    """A CPU batch of several rows runs its Linear layers through oneDNN with packed weights and
    screens the head with BatchScreenedHead (pretrain.inference.decode.decode_layout: the choice by
    rows); one row keeps MKL and the int8 screen. Afterwards no module keeps a forward of its own."""
    from pretrain.inference import decode

    model = _model()
    used = []
    for cls in (decode.ScreenedHead, decode.BatchScreenedHead):
        real = cls.approximate
        monkeypatch.setattr(cls, "approximate", lambda self, h, real=real: used.append(type(self).__name__) or real(self, h))
    packed = []
    real_linear = decode.onednn_linear
    monkeypatch.setattr(decode, "onednn_linear", lambda x, p, b: packed.append(x.size(0)) or real_linear(x, p, b))
    generate(model, RAGGED, max_new_tokens=3, seed=0, top_k=5, eot_id=None)
    # oneDNN's bf16 kernels need AVX512-BF16 / AMX (not there under ONEDNN_MAX_CPU_ISA=AVX2): then int8
    bf16 = decode.onednn_applies(model.head_weight(), torch.bfloat16)
    assert set(used) == {"BatchScreenedHead" if bf16 else "ScreenedHead"} and packed
    used.clear(), packed.clear()
    generate(model, RAGGED[:1], max_new_tokens=3, seed=0, top_k=5, eot_id=None)
    assert set(used) == {"ScreenedHead"} and not packed
    assert not [m for m in model.modules() if "forward" in m.__dict__]


# ---------------------------------------------------------------------------------------------
# The fixed-shape decode step, batched prompts, the per-row random stream, stop strings (issue 20)

SETTINGS = [
    dict(temperature=0),
    dict(temperature=0.8, top_k=50),
    dict(temperature=1.0, top_k=5, top_p=0.9),
    dict(temperature=1.3, top_p=0.9),  # no top-k: the fp32 head over the whole vocabulary (DecodeHead)
    dict(temperature=1.0),
]
RAGGED = [[464, 2068, 7586, 21831, 625, 262], [15496], [40, 1101, 257], [318, 257, 1332, 11, 290, 340, 373, 922, 13]]


def _reference(model, prompt: list[int], n: int, seed: int, **kw) -> list[int]:
    """The path before the static step, kept for HellaSwag: a dynamic KVCache (a
    Python-int position, keys sliced to the length so far, no mask), the full head through
    ``forward(at="last")``, the row alone; sampling with its own stream (``uniforms``)."""
    from pretrain.inference.cache import KVCache
    from pretrain.inference.generate import uniforms

    cache = KVCache.empty(model.config, 1, len(prompt) + n, "cpu", torch.float32)
    u = uniforms(torch.tensor([seed]), n)  # (1, n)
    idx, out = torch.tensor([prompt]), []
    with torch.no_grad():
        for t in range(n):
            logits = model(idx, kv_cache=cache, at="last")[0][:, -1]  # (1, padded V)
            nxt = sample_next(logits, u=u[:, t], **kw)
            out.append(nxt.item())
            idx = nxt[:, None]
    return out


@pytest.mark.numerics
@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_static_step_equals_the_dynamic_cache_path_alone_and_in_a_ragged_batch(kw):
    """generate() (StaticKVCache: left padding, per-row positions, the mask over the preallocated
    columns; the screened / transposed head) gives each row the tokens of the dynamic-cache path
    run on that row alone with that row's seed -- at batch 1 and in a batch of different lengths --
    except where a row parts at a near-tie of its exact logits (counted; the kernels' summation
    order depends on the batch's shape and the CPU, so bitwise equality is not promised)."""
    model = _model()
    n = 20
    alone = [generate(model, [p], max_new_tokens=n, seed=11 + i, eot_id=None, **kw)[0] for i, p in enumerate(RAGGED)]
    batched = generate(model, RAGGED, max_new_tokens=n, seed=11, eot_id=None, **kw)
    reference = [_reference(model, p, n, 11 + i, **kw) for i, p in enumerate(RAGGED)]
    same_except_near_ties(model, RAGGED, batched, alone, seed=11, **kw)
    same_except_near_ties(model, RAGGED, alone, reference, seed=11, **kw)
    assert len({tuple(r) for r in batched}) == len(RAGGED)  # the rows really differ


@pytest.mark.numerics
@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0)], ids=["greedy", "sampling"])
def test_a_rows_logits_in_a_batch_and_alone_are_within_the_derived_bound_of_the_exact(kw, monkeypatch):
    """The first half of the promise: at every step, the fp32 logits a row is sampled from -- in a
    ragged batch of 4 and alone -- are within delta (tests/numerics.py network_bound) of the float64
    logits of the same context; so within 2 delta of each other. (The full head for every row here,
    so the sampler sees all logits; the screens hand it the same fp32 logits of their candidates.)"""
    from numerics import float64_copy, network_bound

    from pretrain.inference import decode
    from pretrain.inference import generate as gen_mod

    for cls in (decode.ScreenedHead, decode.BatchScreenedHead):
        monkeypatch.setattr(cls, "build", classmethod(lambda cls, model: None))
    seen: list[torch.Tensor] = []
    real = gen_mod.sample_next
    monkeypatch.setattr(gen_mod, "sample_next", lambda logits, *a, **k: seen.append(logits.clone()) or real(logits, *a, **k))
    model, ref = _model(), None
    ref = float64_copy(model)
    V = model.config.vocab_size
    n = 12
    order = sorted(range(len(RAGGED)), key=lambda i: -len(RAGGED[i]))  # generate's batch order
    runs = [(order, generate(model, RAGGED, max_new_tokens=n, seed=11, eot_id=None, **kw))]
    for i, p in enumerate(RAGGED):
        seen_before = len(seen)
        runs.append(([i], [None] * i + generate(model, [p], max_new_tokens=n, seed=11 + i, eot_id=None, **kw)))
        assert len(seen) - seen_before == n
    steps = iter(seen)
    worst = 0.0
    for rows, out in runs:
        for t in range(n):
            logits = next(steps)  # (len(rows), V)
            for j, i in enumerate(rows):
                ctx = torch.tensor([RAGGED[i] + out[i][:t]])  # (1, T)
                with torch.no_grad():
                    h = ref.hidden_states(ctx)[:, -1]  # (1, C)
                    exact = ref.logits(h)[0, :V]
                delta = network_bound(model.config, model.config.block_size, h, ref.head_weight()).item()
                err = (logits[j, :V].double() - exact).abs().max().item()
                assert err <= delta, (rows, i, t, err, delta)
                worst = max(worst, err / delta)
    assert 0 < worst < 1  # the paths do round (the bound is not vacuous), within it


def test_the_near_tie_check_refuses_any_other_difference():
    """tests/numerics.py divergences (what the generation tests hold every path to) is not
    vacuous: a row changed at one token to anything but a near-tie fails it, greedy and sampled."""
    model = _model()
    for kw, seed in ((dict(temperature=0), None), (dict(temperature=1.0, top_k=5), 11)):
        out = generate(model, RAGGED, max_new_tokens=10, seed=seed, eot_id=None, **kw)
        assert divergences(model, RAGGED, out, out, None if seed is None else [seed + i for i in range(4)], **kw) == 0
        with torch.no_grad():
            logits = model(torch.tensor([RAGGED[0] + out[0][:4]]))[0][0, -1, :50257]  # (V,)
        bad = [r[:] for r in out]
        bad[0][4] = int(logits.argmin())  # a token no admissible logits pick
        with pytest.raises(AssertionError, match="not a near-tie"):
            divergences(model, RAGGED, bad, out, None if seed is None else [seed + i for i in range(4)], **kw)


@pytest.mark.numerics
def test_rows_do_not_depend_on_their_batch():
    """Row i of a call with seed s draws with seed s + i, from a stream of its own: the same tokens
    alone, in any batch size (``batch_size`` chunks), and for rows that run out of context early
    (a 60-token prompt in a 64-token context gets 4 tokens while its batch goes on) -- up to
    near-ties of the exact logits (another batch shape is another summation order). The same call
    twice is the same kernels on the same shapes: bitwise the same tokens."""
    model = _model()
    prompts = [*RAGGED, [7] * 60, [8, 9]]
    kw = dict(max_new_tokens=24, temperature=1.1, top_k=40, top_p=0.95, eot_id=None)
    sampling = dict(temperature=1.1, top_k=40, top_p=0.95)
    whole = generate(model, prompts, seed=5, **kw)
    assert [len(r) for r in whole] == [24, 24, 24, 24, 4, 24]
    same_except_near_ties(model, prompts, generate(model, prompts, seed=5, batch_size=2, **kw), whole, seed=5, **sampling)
    by_4 = generate(model, prompts, seed=[5 + i for i in range(len(prompts))], batch_size=4, **kw)
    same_except_near_ties(model, prompts, by_4, whole, seed=5, **sampling)
    for i in (0, 4, 5):
        alone = generate(model, [prompts[i]], seed=5 + i, **kw)
        same_except_near_ties(model, [prompts[i]], alone, [whole[i]], seed=5 + i, **sampling)
    g = torch.Generator().manual_seed(3)
    with_gen = generate(model, prompts, generator=g, **kw)
    assert generate(model, prompts, generator=torch.Generator().manual_seed(3), **kw) == with_gen != whole
    torch.manual_seed(4)
    unseeded = generate(model, prompts, **kw)
    torch.manual_seed(4)
    assert generate(model, prompts, **kw) == unseeded  # seed=None follows torch.manual_seed


def test_uniforms_are_uniform_and_independent():
    """The counter-based stream: uniform on [0, 1) (moments, deciles), no correlation between
    neighbouring draws or neighbouring seeds, reproducible, and the same for a seed whatever
    else is in the batch."""
    from pretrain.inference.generate import uniforms

    u = uniforms(torch.arange(500) + 12345, 400)  # (500, 400): 200k draws
    assert u.dtype == torch.float64 and 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.003 and abs(u.var() - 1 / 12) < 0.002  # 5 sigma: 0.0032, 0.0014
    deciles = torch.histc(u.float(), 10, 0, 1) / u.numel()
    assert (deciles - 0.1).abs().max() < 0.004  # binomial std 0.00067
    corr = lambda a, b: torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].abs()  # noqa: E731
    assert corr(u[:, :-1], u[:, 1:]) < 0.012 and corr(u[:-1], u[1:]) < 0.012  # 5 sigma at 200k pairs
    assert torch.equal(uniforms(torch.tensor([12345 + 7]), 400)[0], u[7])
    assert not torch.equal(u[0], u[1])


@pytest.mark.numerics
def test_compiled_decode_step_does_not_recompile(monkeypatch):
    """step='compile': one graph for the decode step, compiled once and not again across 64 decode
    steps nor for the next call of the same batch size and cache bucket with other prompt lengths
    (counted by torch._dynamo); the prefill stays eager. The same tokens as the eager step. (The
    aot_eager backend traces exactly what inductor would get, without C++ compilation.)"""
    import functools

    from benchmarks.profiling import graph_breaks, reset_dynamo_counters
    from pretrain.inference.decode import decoders

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    model = _model(block_size=128)
    prompts, others = [[1, 2, 3], [4, 5, 6, 7, 8]], [[9] * 7, [10, 11]]
    # top-p alone: the whole step compiles (no host sync); top-k on a CPU: the trunk alone (the
    # screened head reads values on the host).
    for kw in (dict(temperature=1.0, top_p=0.9), dict(temperature=0.9, top_k=20)):
        with reset_dynamo_counters():
            compiled = generate(model, prompts, max_new_tokens=65, seed=1, eot_id=None, step="compile", **kw)
            first = graph_breaks()
            again = generate(model, others, max_new_tokens=60, seed=2, eot_id=None, step="compile", **kw)
            second = graph_breaks()
        assert all(len(r) == 65 for r in compiled)
        assert first["unique_graphs"] == 1 and first["graph_breaks"] == 0, first
        assert second["unique_graphs"] == 1, second  # nothing new compiled for the second call
        # the traced graph may decompose ops (another rounding): equal up to near-ties
        eager = generate(model, prompts, max_new_tokens=65, seed=1, eot_id=None, step="eager", **kw)
        same_except_near_ties(model, prompts, compiled, eager, seed=1, **kw)
        eager = generate(model, others, max_new_tokens=60, seed=2, eot_id=None, step="eager", **kw)
        same_except_near_ties(model, others, again, eager, seed=2, **kw)
    assert [(d.batch_size, d.max_len, d.mode) for d in decoders(model)] == [(2, 128, "compile")] * 2


def test_decoders_are_kept_per_batch_size_and_cache_bucket(monkeypatch):
    import functools

    from pretrain.inference.decode import cache_bucket, decoders

    assert [cache_bucket(n) for n in (1, 64, 65, 200, 256, 257, 700)] == [64, 64, 128, 256, 256, 512, 768]
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    model = _model()
    kw = dict(temperature=0, eot_id=None, step="compile")
    generate(model, [[1, 2], [3]], max_new_tokens=10, **kw)
    first = decoders(model)[0]
    generate(model, [[1] * 20, [3]], max_new_tokens=30, **kw)  # 49 columns: the same bucket of 64
    generate(model, [[1, 2], [3], [4]], max_new_tokens=10, **kw)  # another batch size
    generate(model, [[1] * 50], max_new_tokens=14, **kw)  # 63 columns, batch 1
    assert decoders(model)[0] is first
    assert [(d.batch_size, d.max_len) for d in decoders(model)] == [(2, 64), (3, 64), (1, 64)]
    generate(model, [[1, 2], [3]], max_new_tokens=10, temperature=0, eot_id=None)  # eager: nothing kept
    assert len(decoders(model)) == 3


@pytest.mark.numerics
def test_stop_strings_end_each_row_after_the_token_that_completes_them():
    """``stop``: a row ends after the first token whose text completes one of its strings (the
    string stays in the output, as lm-evaluation-harness cuts it itself); per row or for all; with
    end-of-text, whichever comes first; the same with and without the cache."""
    from data_pipeline.tokenizer import get_tokenizer

    tok = get_tokenizer()
    model = _model()
    kw = dict(max_new_tokens=24, temperature=0, eot_id=None)
    full = generate(model, RAGGED[:3], **kw)

    def expected(toks, strings):  # the shortest prefix whose text holds a string
        return next((toks[:k] for k in range(1, len(toks) + 1) if any(s in tok.decode(toks[:k]) for s in strings)), toks)

    s0 = tok.decode(full[0][6:8])[1:4] or tok.decode(full[0][6:8])  # from the middle of row 0's text
    s1 = tok.decode(full[1][10:11])
    stops = [[s0], [s1, "never in this text \u2603"], ["never"]]
    got = generate(model, RAGGED[:3], stop=stops, **kw)
    assert got == [expected(t, s) for t, s in zip(full, stops)]
    assert len(got[0]) <= 8 and len(got[1]) <= 11 and got[2] == full[2]
    no_cache = generate(model, RAGGED[:3], stop=stops, use_kv_cache=False, **kw)
    same_except_near_ties(model, RAGGED[:3], no_cache, got, temperature=0)
    assert generate(model, RAGGED[:3], stop=[s0], **kw)[0] == got[0]  # one list for every row
    with pytest.raises(GenerationError, match="one list, or one per prompt"):
        generate(model, RAGGED[:3], stop=[["a"], ["b"]], **kw)


def test_cli_several_prompts_print_in_order_each_as_generated_alone(exported, tmp_path, capsys):
    """--prompt repeated and --prompts-file: one batch, printed in order under '--- sample i/n ---',
    each sample the text it gets alone (greedy)."""
    f = tmp_path / "prompts.txt"
    f.write_text("The quick brown fox\nOnce upon a time there was\n", encoding="utf-8")
    base = ["--model", str(exported), "--max-new-tokens", "8", "--temperature", "0"]
    assert main([*base, "--prompt", "Hello", "--prompt", "A much longer prompt than the first", "--prompts-file", str(f)]) == 0
    out = capsys.readouterr().out
    samples = [s.strip("\n") for s in out.split("--- sample ")[1:]]
    assert [s.split(" ---\n")[0] for s in samples] == ["1/4", "2/4", "3/4", "4/4"]
    for s, prompt in zip(samples, ["Hello", "A much longer prompt than the first", "The quick brown fox",
                                   "Once upon a time there was"]):
        assert main([*base, "--prompt", prompt]) == 0
        assert s.split(" ---\n", 1)[1] == capsys.readouterr().out.strip("\n")


def test_cli_bad_prompts_file_is_one_line_exit_2(exported, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for path, what in [(tmp_path / "missing.txt", "cannot read it"), (empty, "holds no prompts")]:
        assert main(["--model", str(exported), "--prompts-file", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"gpt2-generate: error: --prompts-file {path}: {what}") and err.count("\n") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("mode, reference", [("graph", "eager"), ("compile+graph", "compile"), ("reduce-overhead", "compile")])
def test_cuda_captured_decode_step_replays_the_step_it_captured(mode, reference):
    """On CUDA the decode step is captured once per (batch size, cache bucket, settings) and
    replayed: the same tokens as running the same step without the graph (eager for 'graph', the
    compiled step for the compiled modes), for seeded top-k / top-p sampling, and for a second batch
    of other prompt lengths (a replay: nothing captured again); 'graph' also for greedy and under
    autocast with fp32 weights (the trainer's in-loop sample). (The compiled modes compile the tiny
    model's step twice each: kept to one setting for the GPU check's time.)"""
    from pretrain.inference.decode import decoders

    model = _model().cuda()
    kw = dict(max_new_tokens=40, seed=3, eot_id=None)
    settings = [dict(temperature=0.9, top_k=50, top_p=0.95)] + ([dict(temperature=0)] if mode == "graph" else [])
    for st in settings:
        for prompts in (RAGGED, [p[::-1] + [5] for p in RAGGED[::-1]]):
            assert generate(model, prompts, step=mode, **kw, **st) == generate(model, prompts, step=reference, **kw, **st)
    kept = [d for d in decoders(model) if d.mode == mode]
    assert len(kept) == len(settings) and all(d.build_s > 0 for d in kept)
    if mode == "graph":
        assert all(d.graph is not None for d in kept)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert generate(model, RAGGED, step=mode, **kw) == generate(model, RAGGED, step=reference, **kw)


@pytest.mark.gpu
def test_cuda_graph_reads_the_current_weights():
    """A captured graph reads the parameters' memory: after an in-place update (an optimizer step)
    it decodes with the new values; after the parameters are replaced (new storage) the decoder is
    captured again, never replaying a graph over freed memory."""
    from pretrain.inference.decode import decoders

    model = _model().cuda()
    kw = dict(max_new_tokens=24, temperature=0, eot_id=None)
    before = generate(model, RAGGED, step="graph", **kw)
    assert before == generate(model, RAGGED, step="eager", **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)  # in place, as an optimizer step
    flipped = generate(model, RAGGED, step="graph", **kw)
    assert flipped == generate(model, RAGGED, step="eager", **kw) != before
    first = decoders(model)[0]
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(fresh, assign=True)  # new storage for every parameter
    assert generate(model, RAGGED, step="graph", **kw) == flipped
    assert decoders(model)[0] is not first


def test_fsdp_sharded_model_generates_what_the_plain_model_does():
    """An FSDP2-sharded model decodes through ``forward`` (its hooks gather the parameters), eagerly,
    under no_grad (FSDP2 reads version counters that inference tensors lack): the same tokens as the
    plain model, for a ragged batch. One process, gloo."""
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        plain = _model()
        sharded = _model()
        for block in sharded.transformer.h:
            fully_shard(block)
        fully_shard(sharded)
        kw = dict(max_new_tokens=10, temperature=0.9, top_k=20, seed=1, eot_id=None)
        assert generate(sharded, RAGGED, **kw) == generate(plain, RAGGED, **kw)
        with pytest.raises(GenerationError, match="FSDP-sharded model decodes eagerly"):
            generate(sharded, RAGGED, step="compile", **kw)
    finally:
        dist.destroy_process_group()
