"""HellaSwag: data checks, the harness's prompt rules, and the batched scorer against plain
one-candidate-at-a-time references (our model, and transformers on an exported copy)."""

from __future__ import annotations

import json
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import assert_within, gamma, logprob_sum_tolerance

from evals import hellaswag as hs
from pretrain.model import GPT, GPTConfig

# HellaSwag-format lines: WikiHow ones with their [header]/[title]/[step]/[substeps] markers,
# ActivityNet ones with a ctx_b, a non-ASCII ending (chars != bytes), a context long enough to
# be left-truncated at block_size 64, and an ending that preprocesses to a leading space.
EXAMPLES = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Home and Garden",
     "ctx_a": "[header] How to clean a grill [title] Heat the grill for 15 minutes. [step] Turn it on high. [step]",
     "ctx_b": "", "ctx": "[header] How to clean a grill [title] Heat the grill for 15 minutes. [step] Turn it on high. [step]",
     "split": "val", "split_type": "zeroshot", "label": 1,
     "endings": ["[substeps] Scrub the grates with a brush.", "Let it cool [title] Wipe the grates.",
                 "Wipe the grates — café style [step] Then let it cool.", " [header] Use foil on the grates."],
     "source_id": "wikihow~12345"},
    {"ind": 7, "activity_label": "Playing harmonica", "ctx_a": "A man is standing on a stage holding a harmonica.",
     "ctx_b": "the man", "ctx": "A man is standing on a stage holding a harmonica. the man", "split": "val",
     "split_type": "indomain", "label": 0,
     "endings": ["plays the harmonica while a crowd claps.", "puts the harmonica in a cup of coffee.",
                 "throws the harmonica at the drummer.", "begins to juggle three apples."],
     "source_id": "activitynet~v_abc"},
    {"ind": 3000, "activity_label": "Personal Care and Style",
     "ctx_a": "[header] How to braid hair [title] Wash and dry your hair. [step] Braids hold best in clean, dry hair. "
              "[substeps] Brush out every tangle first. [title] Divide the hair into three equal sections. [step] "
              "Hold the left section in your left hand, the right one in your right hand, and keep the middle "
              "one free between your fingers so that you can cross it over quickly.",
     "ctx_b": "cross the right section",
     "ctx": "[header] How to braid hair [title] Wash and dry your hair. [step] ... cross the right section",
     "split": "val", "split_type": "indomain", "label": 2,
     "endings": ["over the middle one, then the left over the new middle.", "[title] into a bowl of soup.",
                 "under the bed and wait for an hour.", "over the middle [step] Repeat until the end of the braid."],
     "source_id": "wikihow~987"},
    {"ind": 11, "activity_label": "Washing face", "ctx_a": "A woman leans over a sink.", "ctx_b": "she",
     "ctx": "A woman leans over a sink. she", "split": "val", "split_type": "zeroshot", "label": 2,
     "endings": ["splashes water on her face.", "eats a sandwich.", "rinses her face and dries it with a towel.",
                 "paints the mirror blue."], "source_id": "activitynet~v_xyz"},
    {"ind": 12, "activity_label": "Finance and Business",
     "ctx_a": "[header] How to save money [title] Make a budget. [step] Write down what you spend each week.",
     "ctx_b": "", "ctx": "[header] How to save money [title] Make a budget. [step] Write down what you spend each week.",
     "split": "val", "split_type": "indomain", "label": 0,
     "endings": ["[substeps] Group it into rent, food and fun.", "Buy a boat.", "Naïve plans fail [title] Résumé.",
                 "Spend more."], "source_id": "wikihow~55"},
    {"ind": 13, "activity_label": "Javelin throw", "ctx_a": "An athlete runs down the track with a javelin.",
     "ctx_b": "he", "ctx": "An athlete runs down the track with a javelin. he", "split": "val",
     "split_type": "indomain", "label": 1,
     "endings": ["sits down.", "throws the javelin far into the field.", "drops it.", "waves."],
     "source_id": "activitynet~v_jav"},
]


def write_jsonl(path: Path, examples=EXAMPLES) -> Path:
    path.write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    return path


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset("tiny", **overrides))
    with torch.no_grad():  # sharper distributions than the 0.02 init: no near-ties between endings
        model.transformer.wte.weight.mul_(8.0)
    return model.eval()


# ----------------------------------------------------------------------------- a separate reference


def ref_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def ref_requests(ex: dict, encode) -> list[tuple[str, list[int], list[int]]]:
    """(style, context tokens, continuation tokens) for the 8 candidates, straight from the
    harness's and build-nanogpt's definitions."""
    query = ref_preprocess(ex["activity_label"] + ": " + ex["ctx_a"] + " " + ex["ctx_b"].capitalize())
    out = []
    for ending in ex["endings"]:
        context, cont = query, " " + ref_preprocess(ending)
        stripped = context.rstrip()
        cont, context = context[len(stripped):] + cont, stripped
        whole, ctx = encode(context + cont), encode(context)
        out.append(("harness", ctx, whole[len(ctx):]))
    for ending in ex["endings"]:
        out.append(("completion", encode(ex["ctx"]), encode(" " + ending)))
    return out


def ref_logprob(model, ctx: list[int], cont: list[int], block_size: int) -> float:
    toks = (ctx + cont)[-(block_size + 1):]
    logits, _ = model(torch.tensor([toks[:-1]]))  # (1, T, V): one sequence, no padding
    logp = F.log_softmax(logits[0, :, : model.config.vocab_size].float(), dim=-1)
    n = len(toks) - 1
    return sum(logp[p, toks[p + 1]].item() for p in range(n - len(cont), n))


def ref_metrics(examples, lls, ntoks) -> dict[str, float]:
    right = {k: 0 for k in hs.METRICS}
    for ex, ll, nt in zip(examples, lls, ntoks):
        choices = [ref_preprocess(e) for e in ex["endings"]]

        def first_argmax(xs):
            return max(range(len(xs)), key=lambda i: (xs[i], -i))

        h, c = ll[:4], ll[4:]
        preds = {
            "acc": first_argmax(h),
            "acc_norm": first_argmax([x / len(s) for x, s in zip(h, choices)]),
            "acc_bytes": first_argmax([x / len(s.encode()) for x, s in zip(h, choices)]),
            "completion_acc": first_argmax(c),
            "completion_acc_norm": first_argmax([x / n for x, n in zip(c, nt[4:])]),
        }
        for k, p in preds.items():
            right[k] += int(p == ex["label"])
    return {k: v / len(examples) for k, v in right.items()}


def reference_scores(model, examples, block_size):
    from data_pipeline.tokenizer import get_tokenizer

    enc = get_tokenizer().encode
    lls, ntoks = [], []
    with torch.no_grad():
        for ex in examples:
            reqs = ref_requests(ex, enc)
            lls.append([ref_logprob(model, c, k, block_size) for _, c, k in reqs])
            ntoks.append([len(k) for _, _, k in reqs])
    return lls, ntoks


# ----------------------------------------------------------------------------- prompts


def test_preprocess_and_query_follow_the_harness():
    ex = EXAMPLES[1]
    query, choices = hs.harness_doc(ex)
    # " [title]" -> ". ", markers removed, the trailing "[step]" leaves a trailing space.
    assert query == "Home and Garden: How to clean a grill. Heat the grill for 15 minutes. Turn it on high. "
    assert choices == [" Scrub the grates with a brush.", "Let it cool. Wipe the grates.",
                       "Wipe the grates — café style Then let it cool.", " Use foil on the grates."]
    assert hs.harness_doc(EXAMPLES[0])[0] == "Roof shingle removal: A man is sitting on a roof. He"
    # the trailing space moves into the continuation, which then starts with two spaces
    encode = lambda s: [ord(ch) for ch in s]  # noqa: E731 - a character "tokenizer" makes the split visible
    ctx, cont = hs.encode_pair(encode, query, " " + choices[0], eot_id=0)
    assert "".join(map(chr, ctx)) == query.rstrip() and "".join(map(chr, cont)) == "  " + choices[0]
    assert hs.encode_pair(encode, "", " x", eot_id=7) == ([7], [32, 120])


def test_metrics_by_hand():
    # harness lls, completion lls, completion token counts; choices have 10/2/30/40 characters
    prep = hs.Prepared(labels=[1, 2], choice_chars=[[10, 2, 30, 40], [1, 1, 1, 1]],
                       choice_bytes=[[10, 2, 15, 40], [1, 1, 1, 1]])
    sums = np.array([
        [-10.0, -8.0, -9.0, -12.0], [-6.0, -6.0, -7.0, -9.0],    # example 0: harness, completion
        [-3.0, -2.0, -2.0, -5.0], [-9.0, -8.0, -10.0, -4.0],     # example 1
    ]).reshape(-1)
    counts = np.array([[1] * 4, [3, 2, 7, 9], [1] * 4, [1, 1, 5, 1]]).reshape(-1)
    right = hs.example_predictions(prep, sums, counts)
    # ex 0: acc argmax(-10,-8,-9,-12)=1 ✓; acc_norm (-1,-4,-0.3,-0.3) -> 2 (tie: first) ✗;
    #       acc_bytes (-1,-4,-0.6,-0.3) -> 3 ✗; completion sum (-6,-6,..) -> 0 (tie) ✗;
    #       completion mean (-2,-3,-1,-1) -> 2 ✗
    # ex 1: acc (-3,-2,-2,-5) -> 1 ✗; acc_norm same -> 1 ✗; completion sum -> 3 ✗;
    #       completion mean (-9,-8,-2,-4) -> 2 ✓
    assert {k: v.tolist() for k, v in right.items()} == {
        "acc": [1.0, 0.0], "acc_norm": [0.0, 0.0], "acc_bytes": [0.0, 0.0],
        "completion_acc": [0.0, 0.0], "completion_acc_norm": [0.0, 1.0],
    }
    out = hs.summarize({"acc": 1, "acc_norm": 0, "acc_bytes": 0, "completion_acc": 0, "completion_acc_norm": 3}, 4)
    assert out["hellaswag/acc"] == 0.25 and out["hellaswag/completion_acc_norm"] == 0.75
    # sample standard error of the mean of [1, 0, 0, 0]: std(ddof=1) / sqrt(n)
    assert out["hellaswag/acc_stderr"] == pytest.approx(np.std([1, 0, 0, 0], ddof=1) / 2)
    assert out["hellaswag/num_examples"] == 4


# ----------------------------------------------------------------------------- the scorer


@pytest.mark.numerics
def test_batched_scorer_equals_one_at_a_time_reference(tmp_path):
    model = tiny_model()
    path = write_jsonl(tmp_path / "hs.jsonl")
    ev = hs.HellaSwagEvaluator(path, limit=None, batch_size=5, rank=0, world_size=1, device="cpu")
    got = ev(model, step=0)

    lls, ntoks = reference_scores(model, EXAMPLES, model.config.block_size)
    sums, counts = hs.score_sequences(model, ev.prep.context, ev.prep.continuation, block_size=64, batch_size=5,
                                      vocab_size=model.config.vocab_size)
    flat = [x for row in lls for x in row]
    tol = logprob_sum_tolerance(model, ev.prep.context, ev.prep.continuation, flat, 64)
    assert_within(torch.as_tensor(sums), torch.tensor(flat), tol, "batched vs one at a time")
    assert counts.reshape(len(EXAMPLES), 8).tolist() == ntoks
    # one example really was left-truncated (context + continuation > block_size + 1)
    assert max(len(c) + len(k) for c, k in zip(ev.prep.context, ev.prep.continuation)) > 65
    want = ref_metrics(EXAMPLES, lls, ntoks)
    for k, v in want.items():
        assert got[f"hellaswag/{k}"] == pytest.approx(v), k
    assert got["hellaswag/num_examples"] == len(EXAMPLES)
    # the full-logits path (what a compiled model takes) agrees with the head-at-scored-positions one
    plain, _ = hs.score_sequences(model, ev.prep.context, ev.prep.continuation, block_size=64, batch_size=5,
                                  vocab_size=model.config.vocab_size, head_positions_only=False)
    assert_within(torch.as_tensor(plain), torch.as_tensor(sums), tol, "full logits vs head at scored positions")
    # other batch sizes / buckets / paths give the same numbers
    for bs, pad, head_only in [(1, 1, True), (64, 32, True), (3, 64, False)]:
        again = hs.evaluate(model, ev.prep, batch_size=bs, pad_multiple=pad, head_positions_only=head_only)
        assert {k: again[k] for k in got} == pytest.approx(got)


def test_evaluator_restores_train_mode_and_limit(tmp_path):
    model = tiny_model().train()
    ev = hs.HellaSwagEvaluator(write_jsonl(tmp_path / "hs.jsonl"), limit=3, batch_size=8)
    out = ev(model, 1)
    assert model.training and out["hellaswag/num_examples"] == 3
    model.eval()
    ev(model, 2)
    assert not model.training


def test_transformers_on_exported_model_gives_the_same_numbers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from pretrain.model.hf import export_hf

    model = tiny_model(seed=1, padded_vocab_size=50304)  # padded vocab: -inf columns, dropped on export
    out_dir = export_hf(model, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)

    def encode(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    # The harness's own recipe, with Hugging Face's tokenizer and model.
    lls, ntoks = [], []
    with torch.no_grad():
        for ex in EXAMPLES:
            row_ll, row_n = [], []
            for _, ctx, cont in ref_requests(ex, encode):
                inp = (ctx + cont)[-(hf.config.n_positions + 1):][:-1]
                logits = hf(torch.tensor([inp])).logits[0]  # (T, V)
                logp = F.log_softmax(logits[len(inp) - len(cont):].float(), dim=-1)  # (len(cont), V)
                row_ll.append(logp.gather(1, torch.tensor(cont)[:, None]).sum().item())
                row_n.append(len(cont))
            lls.append(row_ll)
            ntoks.append(row_n)

    prep = hs.prepare(EXAMPLES)
    sums, counts = hs.score_sequences(model, prep.context, prep.continuation, block_size=64, batch_size=16,
                                      vocab_size=model.config.vocab_size)
    np.testing.assert_allclose(sums.reshape(len(EXAMPLES), 8), np.array(lls), rtol=1e-5, atol=1e-4)
    assert counts.reshape(len(EXAMPLES), 8).tolist() == ntoks  # HF and tiktoken tokenize alike
    ours = hs.evaluate(model, prep, batch_size=16)
    for k, v in ref_metrics(EXAMPLES, lls, ntoks).items():
        assert ours[f"hellaswag/{k}"] == pytest.approx(v), k


# ----------------------------------------------------------------------------- data errors


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({k: v for k, v in EXAMPLES[0].items() if k != "ctx_a"}), "missing field 'ctx_a'"),
        (json.dumps({**EXAMPLES[0], "label": 4}), "'label' must be an integer in [0, 4)"),
        (json.dumps({**EXAMPLES[0], "label": -1}), "'label' must be an integer in [0, 4)"),
        (json.dumps({**EXAMPLES[0], "endings": ["a", "b"]}), "'endings' must be a list of 4 strings"),
        (json.dumps({k: v for k, v in EXAMPLES[0].items() if k != "label"}), "missing field 'label'"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(EXAMPLES[0]) + "\n" + json.dumps(EXAMPLES[1]) + "\n" + line + "\n")
    with pytest.raises(hs.HellaSwagError) as e:
        hs.load_examples(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and message in msg and "\n" not in msg


def test_missing_file_and_string_labels(tmp_path):
    with pytest.raises(hs.HellaSwagError, match=r"nope\.jsonl: HellaSwag file not found; pass --hellaswag PATH"):
        hs.HellaSwagEvaluator(tmp_path / "nope.jsonl")
    path = write_jsonl(tmp_path / "hf_style.jsonl", [{**EXAMPLES[0], "label": "3"}])  # HF hub copy: str labels
    assert hs.load_examples(path)[0]["label"] == 3
    with pytest.raises(hs.HellaSwagError, match="test split"):
        hs.canonical_split("test")


def test_download_once_verify_and_offline_error(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "hellaswag_val.jsonl")
    cache = tmp_path / "cache"
    monkeypatch.setitem(hs.HELLASWAG_URLS, "validation", src.as_uri())
    monkeypatch.setitem(hs.EXPECTED_EXAMPLES, "validation", len(EXAMPLES))
    got = hs.resolve_path(None, "val", cache_dir=cache)
    assert got == cache / "hellaswag_val.jsonl" and got.read_bytes() == src.read_bytes()
    meta = json.loads((cache / "hellaswag_val.jsonl.meta.json").read_text())
    assert meta["examples"] == len(EXAMPLES) and meta["size"] == src.stat().st_size

    src.unlink()  # a second call uses the cache, no download
    assert hs.resolve_path(None, "validation", cache_dir=cache) == got
    got.write_text(got.read_text()[:-10])  # a damaged cache is refused
    with pytest.raises(hs.HellaSwagError, match="does not match its recorded size/sha256"):
        hs.resolve_path(None, "validation", cache_dir=cache)

    # a wrong example count is refused; offline gives one line saying what to pass
    write_jsonl(src, EXAMPLES[:2])
    with pytest.raises(hs.HellaSwagError, match="downloaded 2 examples, expected 7"):
        hs.resolve_path(None, "validation", cache_dir=tmp_path / "c2")

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(hs.urllib.request, "urlopen", offline)
    with pytest.raises(hs.HellaSwagError) as e:
        hs.resolve_path(None, "validation", cache_dir=tmp_path / "c3")
    assert "could not download HellaSwag" in str(e.value) and "--hellaswag PATH" in str(e.value)
    assert "eval.hellaswag_path" in str(e.value) and not list((tmp_path / "c3").iterdir())


# ----------------------------------------------------------------------------- the shared-prefix path


def synthetic_requests(seed: int = 0):
    """Groups of candidates sharing a context, with the corner cases of the shared-prefix path:
    continuations that share their first tokens (one LM-head row for both), a one-token
    continuation (nothing to feed after the context), a lone candidate, two groups with the
    same context length (one forward), and a context long enough to be left-truncated."""
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return torch.randint(0, 50257, (n,), generator=g).tolist()

    ctx_a, ctx_b, ctx_c, ctx_long = toks(9), toks(9), toks(4), toks(60)
    shared = toks(3)
    requests = [(ctx_a, shared + toks(5)), (ctx_a, shared + toks(2)), (ctx_a, shared[:2] + toks(4)), (ctx_a, toks(1)),
                (ctx_b, toks(7)), (ctx_b, toks(3)), (ctx_b, toks(3)),
                (ctx_c, toks(1)),
                (ctx_long, toks(10)), (ctx_long, toks(12))]
    return [c for c, _ in requests], [k for _, k in requests]


@pytest.mark.numerics
def test_shared_prefix_path_equals_the_packed_path_and_the_reference():
    model = tiny_model(seed=2, padded_vocab_size=50304)
    ctx, cont = synthetic_requests()
    V = model.config.vocab_size
    want = [ref_logprob(model, c, k, 64) for c, k in zip(ctx, cont)]
    packed, counts = hs.score_sequences(model, ctx, cont, block_size=64, batch_size=4, vocab_size=V,
                                        share_prefix=False)
    tol = logprob_sum_tolerance(model, ctx, cont, want, 64)  # another batch / cache layout: summation order
    assert_within(torch.as_tensor(packed), torch.tensor(want), tol, "packed vs reference")
    assert counts.tolist() == [len(k) for k in cont]
    for bs in (1, 3, 64):
        shared, counts2 = hs.score_sequences(model, ctx, cont, block_size=64, batch_size=bs, vocab_size=V,
                                             share_prefix=True)
        assert_within(torch.as_tensor(shared), torch.tensor(want), tol, f"shared (batch {bs}) vs reference")
        assert_within(torch.as_tensor(shared), torch.as_tensor(packed), tol, f"shared (batch {bs}) vs packed")
        assert counts2.tolist() == counts.tolist()


def test_shared_prefix_runs_each_context_once_and_the_head_once_per_distinct_prefix(monkeypatch):
    model = tiny_model()
    ctx, cont = synthetic_requests()
    fed: list[tuple[int, list[list[int]]]] = []  # (kv_cache.pos, rows) of every run of the trunk
    trunk = model.hidden_states

    def record(idx, kv_cache=None):
        fed.append((kv_cache.pos, idx.tolist()))
        return trunk(idx, kv_cache=kv_cache)

    head_rows = []
    real = model.token_logprobs  # the LM head of the shared-prefix path (GPT.token_logprobs)

    def counting(hidden, *a, **k):
        head_rows.append(hidden.size(0))
        return real(hidden, *a, **k)

    monkeypatch.setattr(model, "token_logprobs", counting)
    monkeypatch.setattr(model, "hidden_states", record)
    sums, _ = hs.score_sequences(model, ctx, cont, block_size=64, batch_size=8, vocab_size=50257)  # automatic
    monkeypatch.undo()
    # the effective prefixes (after left truncation to 65 tokens) and their continuations
    groups: dict[tuple, list[list[int]]] = {}
    for c, k in zip(ctx, cont):
        groups.setdefault(tuple((c + k)[-65:][: -len(k)]), []).append(k)
    prefix_rows = [row for pos, rows in fed if pos == 0 for row in rows]
    assert sorted(map(tuple, prefix_rows)) == sorted(groups)  # every distinct context exactly once
    assert len(groups) == 5  # a, b, c, and the two left-truncated candidates of ctx_long (different prefixes)
    # then one forward per batch of continuations, starting right after their (shared) context
    assert {pos for pos, _ in fed if pos > 0} <= {len(p) for p in groups}
    assert sum(len(rows) for pos, rows in fed if pos > 0) == sum(len(k) > 1 for k in cont)  # one-token ones: none
    # LM-head rows: one per group (its last context position) + one per distinct continuation prefix
    distinct = sum(1 + len({tuple(k[: t + 1]) for k in ks for t in range(len(k) - 1)}) for ks in groups.values())
    assert sum(head_rows) == distinct < sum(len(k) for k in cont)
    want = [ref_logprob(model, c, k, 64) for c, k in zip(ctx, cont)]
    assert_within(torch.as_tensor(sums), torch.tensor(want), logprob_sum_tolerance(model, ctx, cont, want, 64), "sums")


@pytest.mark.numerics
def test_target_logprobs_in_vocab_slices_equals_log_softmax():
    from pretrain.model.head import target_logprobs

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(5, 16, generator=g), torch.randn(1000, 16, generator=g) * 3
    rows = torch.tensor([0, 0, 1, 4, 4, 2, 3])  # rows shared by several targets
    targets = torch.tensor([0, 999, 511, 512, 7, 300, 899])  # slice edges, first and last token
    want = F.log_softmax(hidden @ weight[:900].T, dim=-1)[rows, targets.clamp(max=899)]
    # logits: a dot product of C terms each (<= ||h|| ||w_j||); log-softmax: 2x a logit's error plus its
    # sum over the vocabulary (in slices: another order); twice, for two paths
    scale = hidden.norm(dim=1).max() * weight.norm(dim=1).max()
    tol = 2 * (2 * gamma(16) * scale + gamma(1000) * want.abs().max()).item()
    for chunk in (1, 7, 256, 512, 4096):  # 900 = vocab_size: the 100 padded rows never count
        got = target_logprobs(hidden, weight, rows[targets < 900], targets[targets < 900], vocab_size=900,
                              vocab_chunk=chunk)
        assert_within(got, want[targets < 900], tol, f"vocab_chunk={chunk}")
    bias = torch.randn(1000, generator=g)
    got = target_logprobs(hidden, weight, rows, targets, bias=bias, vocab_chunk=300)
    want = F.log_softmax(hidden @ weight.T + bias, -1)[rows, targets]
    assert_within(got, want, tol + 2 * gamma(17) * bias.abs().max().item(), "with a bias")


def test_path_choice_and_bad_requests():
    model = tiny_model()
    assert hs._prefix_sharing_ok(model)
    assert not hs._prefix_sharing_ok(torch.compile(model, backend="eager"))  # fixed shapes for compiled models
    compiled_blocks = tiny_model()
    compiled_blocks.transformer.h[0].compile(backend="eager")  # what FSDP + compile does per block
    assert not hs._prefix_sharing_ok(compiled_blocks)
    with pytest.raises(ValueError, match="share_prefix=True needs an eager native GPT"):
        hs.score_sequences(torch.compile(model, backend="eager"), [[1]], [[2]], block_size=64, share_prefix=True)
    with pytest.raises(ValueError, match="a context has no tokens"):
        hs.score_sequences(model, [[]], [[2]], block_size=64)
    with pytest.raises(ValueError, match="a continuation has no tokens"):
        hs.score_sequences(model, [[1]], [[]], block_size=64)


def test_continuations_are_cut_into_forwards_of_similar_length():
    # 3 long rows and 5 short ones: two forwards (3×30 + 5×5 + 2×16) beat one (8×30 + 16)
    assert hs._split_sorted([30, 30, 29, 5, 5, 5, 4, 4], cost=16) == [(0, 3), (3, 8)]
    assert hs._split_sorted([30, 30, 29, 5, 5, 5, 4, 4], cost=1000) == [(0, 8)]  # forwards are dear: one
    assert hs._split_sorted([6, 5], cost=0) == [(0, 1), (1, 2)] and hs._split_sorted([], cost=16) == []
    assert hs._split_sorted([5] * 7, cost=16, max_rows=3) == [(0, 1), (1, 4), (4, 7)]  # batch_size rows at most
