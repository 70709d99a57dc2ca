"""The demo end to end (scripts/demo.sh, what `make demo` runs), at toy sizes: every stage runs
for real -- prepare, the trainer, evals.run, HF export, transformers generation, the plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "scripts" / "demo.sh"

TOY = {
    "DEMO_STEPS": "12",
    "DEMO_MAX_TOKENS": "60000",
    "DEMO_VAL_TOKENS": "8192",
    "DEMO_SAMPLE_TOKENS": "8",
    "DEMO_PROMPT": "The list type",
    "DEMO_TRAIN_ARGS": "model.n_layer=1 model.n_embd=64 model.n_head=2 model.block_size=64 data.seq_len=64 "
                       "train.global_batch_tokens=1024 train.micro_batch_size=16 train.log_interval=1 "
                       "eval.interval=6 eval.val_tokens=2048 eval.sample_tokens=4 checkpoint.interval=6",
}


def run_demo(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "DEMO_DIR": str(tmp_path / "demo"), **TOY, **env}
    return subprocess.run(["bash", str(DEMO)], cwd=REPO, env=full, capture_output=True, text=True, timeout=600)


def test_demo_end_to_end(tmp_path):
    proc = run_demo(tmp_path, DEMO_RUN="run-a")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    demo = tmp_path / "demo"
    run = demo / "run-a"

    # Artefacts of every stage.
    assert (demo / "data" / "manifest.json").is_file() and list((demo / "data").glob("val_*.bin"))
    ckpt = run / "checkpoints" / "step_00000012"
    assert (ckpt / "manifest.json").is_file()
    assert (run / "export" / "config.json").is_file() and list((run / "export").glob("model*.safetensors"))
    assert (run / "export" / "vocab.json").is_file() and (run / "export" / "merges.txt").is_file()
    for png in (run / "loss.png", demo / "loss.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (demo / "latest").resolve() == run.resolve()
    sample = (run / "sample.txt").read_text()
    assert sample.startswith("The list type") and len(sample) > len("The list type")

    # Learning happened: the final validation loss is below where training started.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert any("val/loss" in r for r in records)
    start = records[0]["loss"]
    val = json.loads((run / "eval.json").read_text())["results"]["val/loss"]
    assert math.isfinite(val) and val < start - 0.5 and val < math.log(50257), (start, val)

    # The user sees the stages, the HellaSwag hint and a closing summary naming everything.
    for stage in range(1, 7):
        assert f"[demo {stage}/6]" in out
    assert sum("HELLASWAG=" in line for line in out.splitlines()) == 1
    assert "demo done in" in out and f"final val loss  {val:.4f}" in out
    bpb = json.loads((run / "eval.json").read_text())["results"]["val/bpb"]
    assert f"val bits/byte   {bpb:.4f}" in out and 0 < bpb < val / math.log(2)  # > 1 byte per token
    for path in (str(ckpt), str(run / "export"), str(run / "loss.png"), str(run / "export" / "README.md"),
                 str(run / "report.md")):
        assert path in out
    # The model card (from the run's own figures) and the run report.
    from huggingface_hub import ModelCard

    card = ModelCard.load(run / "export" / "README.md")
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["loss"] == round(val, 6)
    report = (run / "report.md").read_text()
    assert report.startswith("# Run report: run-a") and "| `val/loss` |" in report and f"{val:.4f}" in report
    assert "The list type" in report  # the sample
    assert "The list type" in out.split("demo done in")[1]


def test_bad_input_is_one_clear_error(tmp_path):
    proc = run_demo(tmp_path, HELLASWAG=str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "HELLASWAG=" in proc.stderr and "missing.jsonl" in proc.stderr
    proc = run_demo(tmp_path, CORE=str(tmp_path / "no_bundle"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "CORE=" in proc.stderr
    proc = run_demo(tmp_path, DEMO_STEPS="ten")
    assert proc.returncode == 2 and "DEMO_STEPS=ten" in proc.stderr
    proc = run_demo(tmp_path, DEMO_TRAIN_ARGS="optim.lrr=1")  # validated by the trainer, before any work
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "gpt2-train: error: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"]
    assert not (tmp_path / "demo").exists()  # nothing was started


def write_hellaswag(path: Path, n: int = 6) -> Path:
    """A HellaSwag-format jsonl (rowanz fields) about the corpus's own subject."""
    lines = []
    for i in range(n):
        ctx_a = f"The function number {i} returns"
        lines.append(json.dumps({
            "ind": i, "activity_label": "Python", "ctx_a": ctx_a, "ctx_b": "a", "ctx": ctx_a + " a",
            "endings": ["new list of the items.", "purple elephant tomorrow.", "the string value.", "zzz qqq xxx."],
            "label": i % 4, "split": "val", "split_type": "indomain", "source_id": f"synthetic-{i}",
        }))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_demo_with_hellaswag_and_a_rerun_keeps_the_first_run(tmp_path):
    hs = write_hellaswag(tmp_path / "hellaswag_val.jsonl")
    first = run_demo(tmp_path, DEMO_RUN="run-1", DEMO_STEPS="6")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run1 = tmp_path / "demo" / "run-1"
    before = {p: p.stat().st_mtime_ns for p in run1.rglob("*") if p.is_file()}

    from test_core import mixed_tasks, write_bundle

    bundle = write_bundle(tmp_path / "bundle", mixed_tasks(None))
    proc = run_demo(tmp_path, DEMO_RUN="run-2", HELLASWAG=str(hs), DEMO_HELLASWAG_LIMIT="4", CORE=str(bundle),
                    DEMO_CORE_LIMIT="5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run2 = tmp_path / "demo" / "run-2"
    results = json.loads((run2 / "eval.json").read_text())["results"]
    assert "hellaswag/acc_norm" in results and "val/loss" in results
    assert any("hellaswag/acc_norm" in json.loads(line) for line in (run2 / "metrics.jsonl").read_text().splitlines())
    assert "HELLASWAG=" not in proc.stdout and "HellaSwag       acc_norm" in proc.stdout
    assert results["core/num_examples"] == 25 and "CORE (partial)" in proc.stdout  # 5 items of each of 5 tasks
    assert "| `core/mean_centered` |" in (run2 / "report.md").read_text()
    # The rerun made its own directory and left the first run exactly as it was.
    assert {p: p.stat().st_mtime_ns for p in run1.rglob("*") if p.is_file()} == before
    assert (tmp_path / "demo" / "latest").resolve() == run2.resolve()
    assert "run-1: " in proc.stdout and "run-2: " in proc.stdout  # demo/loss.png overlays both runs
