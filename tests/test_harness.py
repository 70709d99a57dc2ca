"""lm-evaluation-harness tasks on our model (``gpt2-eval --tasks``, evals/harness.py, evals/tasks.py)
against the harness's own Hugging Face model on the exported copy: the four request types, through
the harness's real task definitions on local files in the real datasets' schemas
(tests/lm_eval_fixtures.py). Offline, CPU, a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm_eval --model hf

from lm_eval_fixtures import TASKS, tiny_model, write_tasks  # noqa: E402

LIMIT = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Task files, a tiny model as a native checkpoint and as its export, and lm-eval's own
    ``--model hf`` results on the export (with the generated texts)."""
    import os

    root = tmp_path_factory.mktemp("harness")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    include = write_tasks(root / "tasks")
    model = tiny_model()
    from pretrain.checkpoint import Checkpointer
    from pretrain.model.hf import export_hf

    Checkpointer(root / "checkpoints", keep_last=1, rank=0, world_size=1).save(
        1, model, None, {"step": 1}, {}, {"model": model.config.to_dict()})
    export_hf(model, root / "hf")

    import lm_eval
    from lm_eval.tasks import TaskManager

    # What `lm_eval --model hf --model_args pretrained=EXPORT --tasks ... --include_path ... --limit 10` runs.
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={root / 'hf'},dtype=float32", tasks=list(TASKS), limit=LIMIT,
        task_manager=TaskManager(include_path=str(include), include_defaults=False), batch_size=4, device="cpu",
        log_samples=True)
    return root, include, model, theirs


def _flat(results: dict) -> dict[str, float]:
    from evals.tasks import flatten

    return {k: v for k, v in flatten(results).items() if not k.endswith("_stderr")}


def _check_equal(ours: dict[str, float], theirs: dict[str, float], n: int = 8) -> None:
    """Accuracies identical, perplexities (and bits per byte) within 1e-5 relative; ``n`` metrics."""
    assert set(ours) == set(theirs) and len(ours) == n, (sorted(ours), sorted(theirs))
    for key, want in theirs.items():
        got = ours[key]
        if "perplexity" in key or "bits_per_byte" in key:
            assert math.isclose(got, want, rel_tol=1e-5), (key, got, want)
        else:
            assert got == want, (key, got, want)


def _count_loads(monkeypatch) -> list[list[str]]:
    """The task lists the harness's TaskManager.load reads (every dataset of each), from now on."""
    from lm_eval.tasks import TaskManager

    calls, real = [], TaskManager.load
    monkeypatch.setattr(TaskManager, "load", lambda self, tasks: calls.append(list(tasks)) or real(self, tasks))
    return calls


def test_cli_tasks_equal_lm_eval_hf_on_the_export(setup, tmp_path, capsys, monkeypatch):
    from evals.run import main

    root, include, _, theirs = setup
    out = tmp_path / "ours.json"
    loads = _count_loads(monkeypatch)
    assert main(["--model", str(root / "hf"), "--tasks", ",".join(TASKS), "--include-path", str(include),
                 "--limit", str(LIMIT), "--batch-size", "4", "--device", "cpu", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    _check_equal(_flat(payload["harness"]), _flat(theirs))
    assert payload["results"]["tasks/arc_easy_local/acc"] == theirs["results"]["arc_easy_local"]["acc,none"]
    assert payload["requests"]["loglikelihood_rolling"] == LIMIT and payload["requests"]["generate_until"] == LIMIT
    assert loads == [list(TASKS)]  # read once (checked before the model, then run), not again by simple_evaluate
    # acc is not trivially equal: the tiny model gets some right and some wrong, lambada's greedy test too.
    flat = _flat(payload["harness"])
    assert 0 < flat["tasks/arc_easy_local/acc"] < 1 and 0 < flat["tasks/lambada_openai_local/acc"] < 1
    assert "tasks/wikitext_local/word_perplexity" in capsys.readouterr().out


def test_generated_texts_equal_lm_eval_hf(setup):
    """generate_until: the same greedy text as the harness's HF model (stop strings applied)."""
    from evals.tasks import run_tasks, task_manager

    root, include, model, theirs = setup
    ours = run_tasks(model, ["nq_open_local"], limit=LIMIT, batch_size=4, log_samples=True,
                     manager=task_manager(["nq_open_local"], include))
    got = [s["resps"] for s in ours["samples"]["nq_open_local"]]
    want = [s["resps"] for s in theirs["samples"]["nq_open_local"]]
    assert got == want
    assert any(r[0][0].strip() for r in got)  # something was generated, and cut at a stop string
    assert all("\n" not in r[0][0] and "." not in r[0][0] for r in got)


def test_in_loop_tasks_are_read_once_and_every_evaluation_gives_a_fresh_runs_numbers(setup, monkeypatch):
    """eval.tasks (evals.tasks.TaskEvaluator): the task data is read when the evaluator is built and
    the same task objects run at every evaluation -- with the numbers of a run that loads them anew."""
    from evals.tasks import TaskEvaluator, flatten, run_tasks, task_manager

    _, include, model, _ = setup
    names = ["arc_easy_local", "wikitext_local"]
    loads = _count_loads(monkeypatch)
    evaluator = TaskEvaluator(names, limit=4, batch_size=4, include_path=include)
    first, second = evaluator(model), evaluator(model)
    assert loads == [names]
    fresh = flatten(run_tasks(model, names, limit=4, batch_size=4, manager=task_manager(names, include)))
    assert first == second == fresh and {"tasks/arc_easy_local/acc", "tasks/wikitext_local/word_perplexity"} <= set(fresh)
    assert len(loads) == 2  # the fresh run: loaded by simple_evaluate itself


def test_native_checkpoint_and_its_export_give_the_same_numbers(setup, tmp_path):
    from evals.run import main

    root, include, _, _ = setup
    runs = {}
    for name, spec in (("native", root / "checkpoints"), ("export", root / "hf")):
        out = tmp_path / f"{name}.json"
        assert main(["--model", str(spec), "--tasks", "arc_easy_local,lambada_openai_local,wikitext_local",
                     "--include-path", str(include), "--limit", "6", "--device", "cpu", "--out", str(out)]) == 0
        runs[name] = _flat(json.loads(out.read_text())["harness"])
    _check_equal(runs["native"], runs["export"], n=7)


def test_greedy_flags_equal_full_logits_argmax_on_both_scoring_paths():
    """score_sequences(greedy=True): the shared-prefix path (vocabulary-sliced head) and the packed
    path (full logits) agree with an argmax over the full logits, per continuation."""
    from evals.hellaswag import score_sequences

    model = tiny_model(seed=1)
    g = torch.Generator().manual_seed(0)
    ctx = [torch.randint(0, 50257, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (12,), generator=g)]
    cont = [torch.randint(0, 50257, (int(n),), generator=g).tolist() for n in torch.randint(1, 4, (12,), generator=g)]
    with torch.no_grad():  # make some continuations the greedy ones
        for i in range(0, 12, 2):
            seq = list(ctx[i])
            cont[i] = []
            for _ in range(3):
                nxt = int(model(torch.tensor([seq]))[0][0, -1].argmax())
                seq.append(nxt)
                cont[i].append(nxt)
    want = []
    with torch.no_grad():
        for c, k in zip(ctx, cont):
            logits = model(torch.tensor([c + k]))[0][0, len(c) - 1: len(c) + len(k) - 1]
            want.append(bool((logits.argmax(-1) == torch.tensor(k)).all()))
    assert any(want) and not all(want)
    for share in (True, False):
        *_, greedy = score_sequences(model, ctx, cont, block_size=64, batch_size=5, vocab_size=50257,
                                     share_prefix=share, greedy=True)
        assert greedy.tolist() == want, share


def test_unknown_task_and_missing_include_path_exit_2_before_loading(setup, tmp_path, capsys):
    from evals.run import main

    root, include, _, _ = setup
    assert main(["--model", str(root / "hf"), "--tasks", "no_such_task_xyz", "--include-path", str(include)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpt2-eval: error: unknown task 'no_such_task_xyz'"), err
    assert main(["--model", str(root / "hf"), "--tasks", "x", "--include-path", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0], err


def test_without_lm_eval_one_line_says_what_to_install(monkeypatch, tmp_path, capsys):
    import importlib.util

    from evals.run import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["--model", str(tmp_path / "whatever"), "--tasks", "lambada_openai"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e '.[lm-eval]'" in err[0], err


def test_in_loop_tasks_are_logged_once_per_step_across_a_resume(setup, tmp_path):
    """eval.tasks on the demo-sized model (configs/demo.yaml's 4 x 128 GPT-2, vocabulary 50257):
    tasks/<task>/<metric> in metrics.jsonl and TensorBoard at every eval step; rank 0 dies after
    step 6, the resumed run redoes 5..8 and each step (and its task figures) is logged once;
    gpt2-plot draws the task rows."""
    pytest.importorskip("tensorboard")
    from helpers import make_synthetic_shards, metrics, python_cmd, run, tiny_overrides

    from pretrain import plot
    from pretrain.training.tb_logger import read_scalars

    _, include, _, _ = setup
    data = make_synthetic_shards(tmp_path / "data")
    run_dir = tmp_path / "run"
    cmd = python_cmd(tiny_overrides(data, run_dir, **{
        "model.preset": "gpt2", "model.n_layer": 4, "model.n_head": 4, "model.n_embd": 128, "model.block_size": 256,
        "eval.interval": 4, "eval.val_tokens": 0, "eval.tasks": "[arc_easy_local,lambada_openai_local]",
        "eval.tasks_limit": 4, "eval.tasks_include_path": str(include), "logging.tensorboard": "true"}))
    assert run(cmd, check=False, timeout=300, fault="crash:6").returncode == 13
    out = run(cmd, timeout=300).stdout
    assert "resumed from" in out
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    keys = ("tasks/arc_easy_local/acc", "tasks/arc_easy_local/acc_norm", "tasks/lambada_openai_local/acc",
            "tasks/lambada_openai_local/perplexity")
    for r in rows:
        assert all((k in r) == (r["step"] in (4, 8)) for k in keys), r
    assert all(0 <= rows[3][k] <= 1 for k in keys[:3]) and rows[3][keys[3]] > 1
    assert "time/tasks_s" in rows[7]
    scalars = read_scalars(run_dir / "tensorboard")
    assert [s for s, _ in scalars["tasks/arc_easy_local/acc"]] == [4, 8]
    titles = [t for t, _, _ in plot.task_panels(plot.load_runs([run_dir]))]
    assert titles == ["Harness tasks", "Harness tasks (lower is better)"]
    assert plot.main([str(run_dir)]) == 0 and (run_dir / "loss.png").stat().st_size > 10_000
    # The finished run wrote its report (rank 0, after the trainer returned), task figures included.
    assert "run report: " in out
    report = (run_dir / "report.md").read_text()
    assert "| `tasks/arc_easy_local/acc` |" in report and "start_step" not in report
    starts = json.loads((run_dir / "environment.json").read_text())
    assert [e["start_step"] for e in starts] == [0, 4]  # the first start and the resume from step 4


@pytest.mark.slow
def test_two_ranks_split_the_documents_and_give_the_single_process_numbers(setup, tmp_path):
    """torchrun -m evals.run --tasks: the harness gives each rank every other document and gathers
    the metrics on rank 0 (GPTLM.all_gather / gather_object over pretrain.dist)."""
    import sys

    from helpers import free_port, run

    from evals.run import main

    root, include, _, _ = setup
    args = ["--model", str(root / "hf"), "--tasks", ",".join(TASKS), "--include-path", str(include),
            "--limit", "6", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "one.json")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--rdzv_endpoint=127.0.0.1:{free_port()}", "--rdzv_backend=c10d", "-m", "evals.run", *args,
           "--out", str(tmp_path / "two.json")]
    assert run(cmd, timeout=300).returncode == 0
    one = _flat(json.loads((tmp_path / "one.json").read_text())["harness"])
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and sum(two["requests"].values()) < sum(
        json.loads((tmp_path / "one.json").read_text())["requests"].values())  # rank 0 served about half
    _check_equal(_flat(two["harness"]), one)


def test_few_shot_prompts_equal_lm_eval_hf(setup):
    """--num-fewshot: the harness samples the same examples (its seeded sampler) into the same
    prompts on both sides, so the figures still agree."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from evals.tasks import run_tasks, task_manager

    root, include, model, _ = setup
    ours = run_tasks(model, ["arc_easy_local"], limit=6, num_fewshot=2, batch_size=4,
                     manager=task_manager(["arc_easy_local"], include))
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={root / 'hf'},dtype=float32", tasks=["arc_easy_local"], limit=6,
        num_fewshot=2, task_manager=TaskManager(include_path=str(include), include_defaults=False), batch_size=4,
        device="cpu", log_samples=False)
    assert ours["n-shot"]["arc_easy_local"] == 2
    _check_equal(_flat(ours), _flat(theirs), n=2)
