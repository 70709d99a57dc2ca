"""CORE (evals/core.py) against a small scorer written here from the issue's specification of the
reference (nanochat's core_eval.py / base_eval.py): Jinja templates for the prompts, one sequence
per forward with full logits, the common-prefix / common-suffix continuation, left cropping,
lowest mean loss or all-argmax, the Random(1337) shuffle and Random(1234 + idx) few-shot draw,
centred accuracy from the baseline in percent. Fixture bundles in the three ICL formats."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import torch
import torch.nn.functional as F
import yaml

from data_pipeline.tokenizer import EOT_ID, gpt2_encoding
from evals.core import CoreError, CoreEvaluator, load_bundle
from pretrain.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 64
WORDS = ("the a cat dog runs jumps over under house tree river blue green quickly slowly because when city "
         "music über café naïve 東京 seven 42 and or not is was").split()


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("tiny", block_size=BLOCK)).eval()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def mc_items(rng, n, query_words=6, choices=4):
    return [{"query": f"Question: {sentence(rng, query_words)}?", "choices": [sentence(rng, rng.randint(1, 3))
             for _ in range(choices)], "gold": rng.randrange(choices)} for _ in range(n)]


def schema_items(rng, n):
    out = []
    for _ in range(n):
        options = [f"{sentence(rng, 4)} {w}" for w in rng.sample(WORDS, 2)]
        out.append({"context_options": options, "continuation": sentence(rng, 3) + ".", "gold": rng.randrange(2)})
    return out


def lm_items(rng, n, model=None):
    """Contexts with stray whitespace (trimmed by the reference); with ``model``, half the items'
    continuation is the model's own greedy next token (so some are right)."""
    enc = gpt2_encoding()
    out = []
    while len(out) < n:
        ctx = f"  {sentence(rng, 5)} \n"
        cont = sentence(rng, 2)
        if model is not None and len(out) % 2 == 0:
            ids = [EOT_ID] + enc.encode_ordinary(ctx.strip())
            with torch.no_grad():
                g = int(model(torch.tensor([ids]))[0][0, -1].argmax())
            text = enc.decode([g])
            if not (text.startswith(" ") and len(text) > 1 and text[1:] == text[1:].strip()):
                continue
            if enc.encode_ordinary(ctx.strip() + " " + text[1:]) != ids[1:] + [g]:
                continue
            cont = text[1:]
        out.append({"context": ctx, "continuation": cont})
    return out


def write_bundle(root: Path, tasks: list[dict], baselines: dict[str, float] | None = None) -> Path:
    """tasks: {label, type, shots, items[, delim]} -> core.yaml, eval_meta_data.csv, eval_data/<label>.jsonl."""
    (root / "eval_data" / "sub").mkdir(parents=True, exist_ok=True)
    entries = []
    for t in tasks:
        uri = f"sub/{t['label']}.jsonl"
        (root / "eval_data" / uri).write_text("".join(json.dumps(x) + "\n" for x in t["items"]), encoding="utf-8")
        e = {"label": t["label"], "dataset_uri": uri, "num_fewshot": [t["shots"]], "icl_task_type": t["type"]}
        if "delim" in t:
            e["continuation_delimiter"] = t["delim"]
        entries.append(e)
    (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": entries}))
    with open(root / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "Random baseline", "Centered Metric?"])
        for t in tasks:
            b = (baselines or {}).get(t["label"], 100.0 / len(t["items"][0].get("choices", t["items"][0].get(
                "context_options", [0] * 100))))
            w.writerow([t["label"], "cat", t["type"], t["shots"], b, ""])
    return root


def mixed_tasks(model, seed=0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"label": "mc_zero", "type": "multiple_choice", "shots": 0, "items": mc_items(rng, 10)},
        # long few-shot prompts: cropped from the left to the 64-token context
        {"label": "mc_fewshot", "type": "multiple_choice", "shots": 3, "delim": "\nAnswer: ",
         "items": mc_items(rng, 9, query_words=9)},
        {"label": "schema_fewshot", "type": "schema", "shots": 2, "items": schema_items(rng, 8)},
        {"label": "lm_zero", "type": "language_modeling", "shots": 0, "items": lm_items(rng, 8, model)},
        {"label": "lm_fewshot", "type": "language_modeling", "shots": 2, "items": lm_items(rng, 6)},
    ]


# --------------------------------------------------------------------------- the independent scorer

_SHOTS = "{%- for ex in shots -%}"
TEMPLATES = {
    "multiple_choice": _SHOTS + "{{ ex.query }}{{ d }}{{ ex.choices[ex.gold] }}\n\n{% endfor -%}{{ item.query }}{{ d }}{{ x }}",
    "schema": _SHOTS + "{{ ex.context_options[ex.gold] }}{{ d }}{{ ex.continuation }}\n\n{% endfor -%}{{ x }}{{ d }}"
                       "{{ item.continuation }}",
    "language_modeling": _SHOTS + "{{ ex.context | trim }}{{ d }}{{ ex.continuation }}\n\n{% endfor -%}"
                                  "{{ item.context | trim }}{{ d }}{% if x %}{{ item.continuation }}{% endif %}",
}


def reference_core(model, bundle: Path, limit=None, crops=None) -> dict[str, float]:
    """CORE as the specification says, one sequence per forward with the full logits."""
    enc = gpt2_encoding()
    cfg = yaml.safe_load((bundle / "core.yaml").read_text())
    with open(bundle / "eval_meta_data.csv") as f:
        base = {r["Eval Task"]: float(r["Random baseline"]) for r in csv.DictReader(f)}
    out, centred = {}, []
    for t in cfg["icl_tasks"]:
        kind, k, d = t["icl_task_type"], t["num_fewshot"][0], t.get("continuation_delimiter", " ")
        data = [json.loads(line) for line in (bundle / "eval_data" / t["dataset_uri"]).read_text("utf-8").splitlines()]
        random.Random(1337).shuffle(data)
        data = data[:limit] if limit else data
        tmpl = jinja2.Template(TEMPLATES[kind])
        right = 0
        for idx, item in enumerate(data):
            shots = [data[i] for i in random.Random(1234 + idx).sample([i for i in range(len(data)) if i != idx], k)]
            if kind == "language_modeling":
                texts = [tmpl.render(shots=shots, d=d, item=item, x=False).strip(),
                         tmpl.render(shots=shots, d=d, item=item, x=True)]
            else:
                xs = item["choices"] if kind == "multiple_choice" else item["context_options"]
                texts = [tmpl.render(shots=shots, d=d, item=item, x=x) for x in xs]
            toks = [[EOT_ID] + enc.encode_ordinary(s) for s in texts]
            m = min(map(len, toks))
            if kind == "multiple_choice":
                p = next((i for i in range(m) if len({s[i] for s in toks}) > 1), m)
                spans = [(s, p, len(s)) for s in toks]
            elif kind == "schema":
                q = next((i for i in range(m) if len({s[-1 - i] for s in toks}) > 1), m)
                spans = [(s, len(s) - q, len(s)) for s in toks]
            else:
                assert toks[1][:len(toks[0])] == toks[0]
                spans = [(toks[1], len(toks[0]), len(toks[1]))]
            losses, ok = [], True
            for s, a, b in spans:
                cut = max(0, len(s) - BLOCK)
                if cut and crops is not None:
                    crops.append(t["label"])
                s, a, b = s[cut:], a - cut, b - cut
                with torch.no_grad():
                    logits = model(torch.tensor([s]))[0][0]  # (T, V)
                nll = F.cross_entropy(logits, torch.tensor(s[1:] + s[:1]), reduction="none")  # targets rolled by one
                nll[-1] = math.nan  # no target after the last token
                losses.append(nll[a - 1:b - 1].mean().item())  # a = 0: an empty slice, NaN
                if kind == "language_modeling":
                    ok = ok and bool((logits[a - 1:b - 1].argmax(-1) == torch.tensor(s[a:b])).all())
            right += ok if kind == "language_modeling" else losses.index(min(losses)) == item["gold"]
        acc = right / len(data)
        out[t["label"]] = acc
        centred.append((acc - base[t["label"]] / 100) / (1 - base[t["label"]] / 100))
    out["CORE"] = sum(centred) / len(centred)
    return out


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["mc_fewshot", "schema_fewshot", "lm_zero"])
def test_each_task_type_equals_the_specification(tmp_path, kind):
    model = tiny_model()
    task = next(t for t in mixed_tasks(model) if t["label"] == kind)
    bundle = write_bundle(tmp_path, [task])
    crops = []
    want = reference_core(model, bundle, crops=crops)
    got = CoreEvaluator(bundle, batch_size=5)(model)
    assert got[f"core/{kind}/acc"] == want[kind]
    assert got["core/CORE"] == pytest.approx(want["CORE"], abs=1e-6)
    if kind == "mc_fewshot":
        assert crops, "the few-shot prompts must be longer than the context (left cropping)"
    if kind == "lm_zero":
        assert 0 < want[kind] < 1, "the fixture must hold items the model gets right and wrong"


def test_mixed_bundle_core_equals_the_specification_packed_and_shared_prefix(tmp_path):
    model = tiny_model()
    bundle = write_bundle(tmp_path, mixed_tasks(model))
    want = reference_core(model, bundle)
    shared = CoreEvaluator(bundle, batch_size=7, block_size=BLOCK)(model)
    assert shared["core/CORE"] == pytest.approx(want["CORE"], abs=1e-6)
    for label in ("mc_zero", "mc_fewshot", "schema_fewshot", "lm_zero", "lm_fewshot"):
        assert shared[f"core/{label}/acc"] == want[label], label
    assert shared["core/num_examples"] == 10 + 9 + 8 + 8 + 6
    # the packed path (what a compiled or FSDP model takes) makes the same decisions
    from evals import core

    packed = core.score_sequences

    def force_packed(*a, **k):
        return packed(*a, **{**k, "share_prefix": False, "head_positions_only": False})

    core.score_sequences = force_packed
    try:
        assert CoreEvaluator(bundle, batch_size=4)(model) == shared
    finally:
        core.score_sequences = packed


def test_limit_takes_the_first_items_after_the_shuffle_and_is_not_core(tmp_path):
    model = tiny_model(1)
    bundle = write_bundle(tmp_path, mixed_tasks(model, seed=3))
    got = CoreEvaluator(bundle, limit=5)(model)
    want = reference_core(model, bundle, limit=5)
    assert "core/CORE" not in got and got["core/mean_centered"] == pytest.approx(want["CORE"], abs=1e-6)
    assert got["core/num_examples"] == 5 * 5
    from evals.core import evaluate_core

    assert evaluate_core(model, bundle, limit=5, batch_size=3) == got  # the Python API
    with pytest.raises(CoreError, match=r"mc_fewshot.* draws 3 few-shot examples .* first 3 .* raise the limit"):
        load_bundle(bundle, limit=3)


def test_two_ranks_give_the_one_process_numbers(tmp_path, capsys):
    """gpt2-eval --core on an export: one process, and two ranks under torchrun (gloo)."""
    from evals.run import main
    from pretrain.model.hf import export_hf

    model = tiny_model(2)
    export_hf(model, tmp_path / "hf")
    bundle = write_bundle(tmp_path / "bundle", mixed_tasks(model, seed=5))
    args = ["--model", str(tmp_path / "hf"), "--core", str(bundle), "--batch-size", "6", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "one.json")]) == 0
    out = capsys.readouterr().out
    assert "core/CORE" in out and "OpenAI GPT-2 CORE: 124M 0.1139" in out and "hellaswag" not in out
    one = json.loads((tmp_path / "one.json").read_text())["results"]
    assert one["core/CORE"] == pytest.approx(reference_core(model, bundle)["CORE"], abs=1e-6)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "evals.run", *args,
           "--out", str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and two["results"] == one


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bad_bundles(root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (bundle directory, what the one line must name)."""
    rng = random.Random(0)
    good = [{"label": "t", "type": "multiple_choice", "shots": 0, "items": mc_items(rng, 3)}]
    out = {"missing bundle": (root / "no_bundle", "no such bundle directory")}
    d = write_bundle(root / "missing_file", good)
    (d / "eval_data" / "sub" / "t.jsonl").unlink()
    out["missing task file"] = (d, "t.jsonl: task file not found")
    d = write_bundle(root / "unknown_type", good)
    (d / "core.yaml").write_text((d / "core.yaml").read_text().replace("multiple_choice", "ranking"))
    out["unknown task type"] = (d, "icl_task_type 'ranking'; expected one of multiple_choice, schema")
    out["baseline missing"] = (write_bundle(root / "no_baseline", good, baselines={"t": 25}), "")
    with open(out["baseline missing"][0] / "eval_meta_data.csv", "w") as f:
        f.write("Eval Task,Random baseline\nother,25\n")
    out["baseline missing"] = (out["baseline missing"][0], "no 'Random baseline' for task 't'")
    bad_gold = [{**x, "gold": 4} for x in good[0]["items"]]
    out["gold out of range"] = (write_bundle(root / "bad_gold", [{**good[0], "items": bad_gold}]),
                                "'gold' must be an index into 'choices' (0..3), got 4")
    d = write_bundle(root / "bad_json", good)
    with open(d / "eval_data" / "sub" / "t.jsonl", "a") as f:
        f.write("{not json\n")
    out["malformed jsonl"] = (d, "t.jsonl:4: not valid JSON")
    d = write_bundle(root / "missing_field", [{**good[0], "items": [{"query": "q", "gold": 0}] * 3}])
    out["missing field"] = (d, "t.jsonl:1: missing field 'choices'")
    return out


def test_bad_bundles_are_refused_in_one_line(tmp_path):
    for name, (bundle, needle) in bad_bundles(tmp_path).items():
        with pytest.raises(CoreError) as e:
            load_bundle(bundle)
        assert needle in str(e.value) and "\n" not in str(e.value), (name, str(e.value))


def test_math_of_centred_accuracy():
    """(acc - b/100) / (1 - b/100): a model at the random baseline scores 0, a perfect one 1."""
    from evals.core import CoreTask, summarize

    tasks = [CoreTask("a", "multiple_choice", 0, " ", 25.0, Path("a"), items=[{}] * 4),
             CoreTask("b", "schema", 0, " ", 50.0, Path("b"), items=[{}] * 2)]
    out = summarize(tasks, [1.0, 2.0], limited=False)
    assert out["core/a/centered"] == 0.0 and out["core/b/centered"] == 1.0 and out["core/CORE"] == 0.5
    assert math.isclose(out["core/a/acc"], 0.25)


def test_in_loop_core_is_logged_at_eval_steps_across_a_resume(tmp_path):
    """eval.core / eval.core_limit in training: core/... in metrics.jsonl at every eval step; rank 0
    dies after step 6, the resumed run logs each step (and its CORE figures) once; the report shows
    them beside OpenAI GPT-2's CORE."""
    from helpers import make_synthetic_shards, metrics, python_cmd, run, tiny_overrides

    bundle = write_bundle(tmp_path / "bundle", mixed_tasks(None, seed=7))
    data = make_synthetic_shards(tmp_path / "data")
    run_dir = tmp_path / "run"
    cmd = python_cmd(tiny_overrides(data, run_dir, **{
        "model.preset": "tiny", "eval.interval": 4, "eval.val_tokens": 256, "eval.core": str(bundle),
        "eval.core_limit": 5}))
    assert run(cmd, check=False, timeout=300, fault="crash:6").returncode == 13
    assert "resumed from" in run(cmd, timeout=300).stdout
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    keys = ("core/mean_centered", "core/mc_fewshot/acc", "core/lm_zero/centered", "val/bpb")
    for r in rows:
        assert all((k in r) == (r["step"] in (4, 8)) for k in keys), r
    assert "core/CORE" not in rows[3] and rows[3]["core/num_examples"] == 25
    report = (run_dir / "report.md").read_text()
    assert "| `core/mean_centered` |" in report and "| `val/bpb` |" in report and "OpenAI GPT-2 CORE" in report


def test_config_refuses_a_bad_bundle_path_before_any_work(tmp_path):
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval.core=.*nope.* is not a CORE bundle directory"):
        load_config(None, [f"eval.core={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="eval.core_limit=3 without eval.core"):
        load_config(None, ["eval.core_limit=3"])
    with pytest.raises(ConfigError, match="eval.core_limit=0 must be > 0"):
        load_config(None, [f"eval.core={tmp_path}", "eval.core_limit=0"])


def test_card_shows_core_and_bpb_beside_gpt2(tmp_path):
    from pretrain.card import RunFacts, body, eval_results

    facts = RunFacts(figures={"val/loss": 3.3, "val/bpb": 1.1, "core/CORE": 0.05, "core/copa/acc": 0.6,
                              "core/copa/centered": 0.2, "core/num_examples": 100.0},
                     figures_from="gpt2-eval (RUN_DIR/eval.json)")
    text = body(tiny_model(), facts, "m", None)
    assert "| `core/CORE` | 0.0500 | 0.1139 |" in text and "| `val/bpb` | 1.1000 |" in text
    assert "OpenAI GPT-2 CORE: 124M 0.1139, 355M 0.1849, 774M 0.2146, 1.5B 0.2565" in text
    names = {(r.dataset_name, r.metric_type) for r in eval_results(facts)}
    assert {("DCLM CORE", "CORE"), ("DCLM CORE: copa", "acc"), ("DCLM CORE: copa", "centered")} <= names


def test_choices_without_scored_tokens_decide_as_the_reference(tmp_path):
    """A choice whose tokens are a prefix of another's (no continuation token of its own) and schema
    options that tokenize the same (no token before the continuation): NaN mean losses in the
    reference, whose min / index then decide; the same decisions here."""
    rng = random.Random(4)
    mc = mc_items(rng, 4) + [{"query": "Pick one:", "choices": ["cat", "cat dog", "cat blue"], "gold": 0},
                             {"query": "Pick one:", "choices": ["cat dog", "cat", "cat blue"], "gold": 2}]
    schema = schema_items(rng, 4) + [{"context_options": ["Same text", "Same text"], "continuation": "ends.",
                                      "gold": 1}]
    bundle = write_bundle(tmp_path, [{"label": "mc", "type": "multiple_choice", "shots": 0, "items": mc},
                                     {"label": "sc", "type": "schema", "shots": 0, "items": schema}])
    model = tiny_model(3)
    want = reference_core(model, bundle)
    got = CoreEvaluator(bundle)(model)
    assert (got["core/mc/acc"], got["core/sc/acc"]) == (want["mc"], want["sc"])
