"""gpt2-eval end to end (one process and 2-rank torchrun on gloo), and the in-loop evaluators
on a torch.compile'd model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals import hellaswag as hs
from evals.run import main
from evals.val_loss import ValLossEvaluator

sys.path.insert(0, str(Path(__file__).parent))
from test_hellaswag import EXAMPLES, ref_metrics, reference_scores, tiny_model, write_jsonl  # noqa: E402
from test_val_loss import make_val_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--model", "--hellaswag", "--val-data", "--val-tokens", "--limit", "--batch-size", "--device",
                "--out", "--compile", "--seq-len", "--hellaswag-split"):
        assert opt in text, opt
    assert "(default: 32)" in text and "(default: validation)" in text and "(default: auto)" in text


def test_cli_one_process_and_two_rank_torchrun_agree(tmp_path, capsys):
    from pretrain.model.hf import export_hf

    model = tiny_model(seed=2)
    export_hf(model, tmp_path / "hf")
    data = write_jsonl(tmp_path / "hs.jsonl")
    val = tmp_path / "val"
    val.mkdir()
    make_val_data(val, sizes=(5 * 16 + 1, 6 * 16 + 3), vocab=50257)
    args = ["--model", str(tmp_path / "hf"), "--hellaswag", str(data), "--val-data", str(val), "--val-tokens",
            str(11 * 16), "--seq-len", "16", "--batch-size", "3", "--device", "cpu"]

    assert main(args + ["--out", str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    table = capsys.readouterr().out
    assert "hellaswag/acc_norm" in table and "val/loss" in table and "±" in table
    res = one["results"]
    assert res["hellaswag/num_examples"] == len(EXAMPLES) and res["val/tokens"] == 11 * 16
    # the CLI (model read back from the HF export) == the scorer on the in-memory model
    direct = hs.evaluate(model, hs.prepare(EXAMPLES), batch_size=7)
    assert {k: res[k] for k in direct} == pytest.approx(direct)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "evals.run",
           *args, "--out", str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2
    for k, v in res.items():
        if k.startswith("hellaswag/"):
            assert two["results"][k] == v, k  # counts: exactly equal
        else:
            assert two["results"][k] == pytest.approx(v, rel=1e-6), k
    # ... and both equal the plain one-candidate-at-a-time loop
    for k, v in ref_metrics(EXAMPLES, *reference_scores(model, EXAMPLES, 64)).items():
        assert two["results"][f"hellaswag/{k}"] == pytest.approx(v), k


def test_default_val_tokens_take_all_of_a_small_split(tmp_path, capsys):
    """Without --val-tokens gpt2-eval evaluates up to 10,485,760 tokens: all of a smaller split
    (it used to refuse any split smaller than that, advising a training config key)."""
    from pretrain.model.hf import export_hf

    export_hf(tiny_model(seed=2), tmp_path / "hf")
    val = tmp_path / "val"
    val.mkdir()
    make_val_data(val, sizes=(5 * 16 + 1,), vocab=50257)
    args = ["--model", str(tmp_path / "hf"), "--no-hellaswag", "--val-data", str(val), "--seq-len", "16",
            "--device", "cpu", "--out", str(tmp_path / "r.json")]
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["results"]["val/tokens"] == 5 * 16


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--hellaswag", str(tmp_path / "missing.jsonl"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.jsonl: HellaSwag file not found" in err[0]


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_in_loop_evaluators_on_a_compiled_model(tmp_path, backend):
    """What pretrain/train.py does every eval.interval steps: both evaluators, called twice on
    the torch.compile'd module; fixed shapes mean the second round compiles nothing new."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    make_val_data(tmp_path, vocab=50257)
    model = tiny_model().train()
    compiled = torch.compile(model, backend=backend)
    evaluators = [
        ValLossEvaluator(tmp_path, seq_len=16, batch_size=4, num_tokens=8 * 16, rank=0, world_size=1, device="cpu"),
        hs.HellaSwagEvaluator(write_jsonl(tmp_path / "hs.jsonl"), limit=None, batch_size=8, rank=0, world_size=1,
                              device="cpu"),
    ]
    rounds = []
    for step in (100, 200):
        out = {}
        for ev in evaluators:
            out.update(ev(compiled, step))
        assert model.training  # each evaluator restored train mode
        rounds.append((out, dict(counters["stats"])))
    (first, stats1), (second, stats2) = rounds
    assert first == second
    assert stats2.get("unique_graphs") == stats1.get("unique_graphs")  # no recompiles on the second round
    eager = {}
    for ev in evaluators:
        eager.update(ev(model, 0))
    assert eager == pytest.approx(first, rel=1e-5)
    assert set(first) >= {"val/loss", "val/ppl", "hellaswag/acc", "hellaswag/acc_norm", "hellaswag/completion_acc_norm"}


@pytest.mark.gpu
def test_cuda_bf16_matches_cpu(tmp_path):
    """On CUDA the evaluators run under bf16 autocast; the numbers stay close to fp32 on CPU."""
    make_val_data(tmp_path, vocab=50257)
    model = tiny_model()
    path = write_jsonl(tmp_path / "hs.jsonl")
    out = {}
    for dev in ("cpu", "cuda"):
        m = model.to(dev)
        out[dev] = {**ValLossEvaluator(tmp_path, 16, 4, 8 * 16, 0, 1, dev)(m, 0),
                    **hs.HellaSwagEvaluator(path, None, 8, 0, 1, dev)(torch.compile(m), 0)}
    assert out["cuda"]["val/loss"] == pytest.approx(out["cpu"]["val/loss"], rel=2e-2)
    assert out["cuda"]["hellaswag/num_examples"] == len(EXAMPLES)
