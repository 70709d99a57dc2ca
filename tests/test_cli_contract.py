"""The failure contract of every CLI (docs/DESIGN.md "Failures"), table-driven: each bad input
exits 2 with exactly one line on stderr naming the thing, and changes no file anywhere.

The CLIs run in process (``main(argv)``); the only subprocess is the lock holder, since a POSIX
lock cannot conflict with its own process."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, make_synthetic_shards, tiny_overrides

TINY = {"schedule.max_steps": 4, "checkpoint.interval": 4}


def snapshot(root: Path) -> dict[str, str]:
    """Every file's content hash and every directory under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = "dir"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() + f":{p.stat().st_mtime_ns}"
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data (good, truncated, missing a shard), a finished 4-step run, bad files, a locked run dir."""
    from pretrain.train import main as train

    root = tmp_path_factory.mktemp("contract")
    data = make_synthetic_shards(root / "data")
    run = root / "run"
    assert train(tiny_overrides(data, run, **TINY)) == 0
    trunc = root / "data_trunc"
    shutil.copytree(data, trunc)
    with open(trunc / "train_000001.bin", "r+b") as f:
        f.truncate(2000)
    missing = root / "data_missing"
    shutil.copytree(data, missing)
    names = ["val_000000.bin", "train_000000.bin", "train_000001.bin"]
    (missing / "manifest.json").write_text(json.dumps({"shards": [
        {"file": n, "split": n.split("_")[0], "tokens": 0, "documents": 0, "sha256": ""} for n in names]}))
    (missing / "train_000001.bin").unlink()
    (root / "a_file").write_text("not a directory\n")
    (root / "hs_latin1.jsonl").write_bytes(b'{"ctx": "caf\xe9"}\n')
    (root / "hs_ok.jsonl").write_text(json.dumps({
        "ctx": "A man", "ctx_a": "A man", "ctx_b": "", "activity_label": "x", "endings": ["a", "b", "c", "d"], "label": 0}) + "\n")
    mine = root / "my_model"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}\n')
    (root / "empty_dir").mkdir()
    locked = root / "locked_run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pretrain.training.rundir import RunDirLock; "
         f"RunDirLock({str(locked)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield root
    holder.kill()
    holder.wait()


def _train(root: Path, run: str = "run", data: str = "data", **extra) -> list[str]:
    return tiny_overrides(root / data, root / run, **{**TINY, **extra})


# (id, module with main(argv), argv from the fixture's root, a substring the one line must hold)
CASES = [
    ("train: --config is a directory", "pretrain.train", lambda r: ["--config", str(r)], "is a directory"),
    ("train: unknown key", "pretrain.train", lambda r: _train(r, "new", **{"optim.lrr": 1}), "optim.lrr"),
    ("train: no data", "pretrain.train", lambda r: _train(r, "new", "nodata"), "nodata"),
    ("train: truncated shard", "pretrain.train", lambda r: _train(r, "new", "data_trunc"), "train_000001.bin"),
    ("train: missing shard", "pretrain.train", lambda r: _train(r, "new", "data_missing"), "train_000001.bin"),
    ("train: run_dir cannot be created", "pretrain.train", lambda r: _train(r, "a_file/run"), "a_file"),
    ("train: missing HellaSwag file", "pretrain.train",
     lambda r: _train(r, "new", **{"eval.interval": 2, "eval.hellaswag": "true", "eval.val_tokens": 0,
                                   "eval.hellaswag_path": str(r / "nope.jsonl")}), "nope.jsonl"),
    ("train: resume with another seq_len", "pretrain.train",
     lambda r: _train(r, **{"data.seq_len": 16, "train.global_batch_tokens": 128}), "seq_len"),
    ("train: resume with another global batch", "pretrain.train",
     lambda r: _train(r, **{"train.global_batch_tokens": 512}), "global_batch_seqs"),
    ("train: resume with other shards", "pretrain.train", lambda r: _train(r, data="data_missing_ok"), "shards"),
    ("train: resume past a lowered max_steps", "pretrain.train",
     lambda r: _train(r, **{"schedule.max_steps": 2}), "schedule.max_steps"),
    ("train: fresh start over checkpoints", "pretrain.train", lambda r: _train(r) + ["--resume", "none"],
     "--resume auto"),
    ("train: resume from a non-checkpoint", "pretrain.train",
     lambda r: _train(r, "new") + ["--resume", str(r / "empty_dir")], "not a checkpoint"),
    ("train: run dir held by another trainer", "pretrain.train", lambda r: _train(r, "locked_run"), "PID"),
    ("prepare: missing source", "data_pipeline.prepare",
     lambda r: [str(r / "nope.txt"), str(r / "prep_out"), "--no-progress"], "nope.txt"),
    ("eval: --limit 0", "evals.run",
     lambda r: ["--model", str(r / "run"), "--hellaswag", str(r / "hs_ok.jsonl"), "--limit", "0"], "--limit"),
    ("eval: non-UTF-8 HellaSwag", "evals.run",
     lambda r: ["--model", str(r / "run"), "--hellaswag", str(r / "hs_latin1.jsonl"), "--device", "cpu"],
     "hs_latin1.jsonl:1"),
    ("eval: missing HellaSwag file", "evals.run",
     lambda r: ["--model", str(r / "run"), "--hellaswag", str(r / "nope.jsonl")], "nope.jsonl"),
    ("eval: --out under a file", "evals.run",
     lambda r: ["--model", str(r / "run"), "--no-hellaswag", "--val-data", str(r / "data"),
                "--out", str(r / "a_file" / "x.json")], "a_file"),
    ("eval: not a model", "evals.run",
     lambda r: ["--model", str(r / "empty_dir"), "--hellaswag", str(r / "hs_ok.jsonl"), "--device", "cpu"],
     "empty_dir"),
    ("export: --out holds the user's own config.json", "pretrain.model.export",
     lambda r: ["export", "--checkpoint", str(r / "run" / "checkpoints"), "--out", str(r / "my_model")],
     "my_model"),
    ("export: not a model", "pretrain.model.export",
     lambda r: ["export", "--checkpoint", str(r / "empty_dir"), "--out", str(r / "export")], "empty_dir"),
    ("generate: not a model", "pretrain.model.generate", lambda r: ["--model", str(r / "empty_dir")], "empty_dir"),
    ("generate: --num-samples 0", "pretrain.model.generate",
     lambda r: ["--model", str(r / "run" / "checkpoints"), "--num-samples", "0"], "--num-samples"),
    ("generate: --device cuda without CUDA", "pretrain.model.generate",
     lambda r: ["--model", str(r / "run" / "checkpoints"), "--device", "cuda"], "--device cuda"),
    ("eval: --device cuda without CUDA", "evals.run",
     lambda r: ["--model", str(r / "run"), "--no-hellaswag", "--device", "cuda"], "--device cuda"),
    ("plot: --out under a file", "pretrain.training.plot",
     lambda r: [str(r / "run"), "--out", str(r / "a_file" / "loss.png")], "a_file"),
    ("plot: no metrics", "pretrain.training.plot", lambda r: [str(r / "empty_dir")], "empty_dir"),
    ("report: not a run directory", "pretrain.report", lambda r: [str(r / "empty_dir")], "empty_dir"),
    ("eval: --include-path without --tasks", "evals.run",
     lambda r: ["--model", str(r / "run"), "--include-path", str(r / "empty_dir")], "--tasks"),
    ("eval: unknown harness task", "evals.run",
     lambda r: ["--model", str(r / "run"), "--tasks", "no_such_task", "--include-path", str(r / "empty_dir")],
     "no_such_task"),
    ("export: --push-to-hub not OWNER/NAME", "pretrain.model.export",
     lambda r: ["export", "--checkpoint", str(r / "run" / "checkpoints"), "--out", str(r / "export"),
                "--push-to-hub", "no-slash"], "--push-to-hub"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(world, case, capsys):
    import importlib

    name, module, argv, needle = case
    if "without CUDA" in name:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    if name.endswith("other shards"):  # the run's data, one shard fewer (same names otherwise)
        d = world / "data_missing_ok"
        if not d.exists():
            shutil.copytree(world / "data", d)
            (d / "train_000001.bin").unlink()
    before = snapshot(world)
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = importlib.import_module(module).main(argv(world))
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prog = {"pretrain.train": "gpt2-train", "data_pipeline.prepare": "gpt2-prepare", "evals.run": "gpt2-eval",
            "pretrain.model.export": "gpt2-export", "pretrain.model.generate": "gpt2-generate", "pretrain.training.plot": "gpt2-plot",
            "pretrain.report": "gpt2-report"}[module]
    assert lines[0].startswith(f"{prog}: error"), lines[0]
    assert needle in lines[0], lines[0]
    assert snapshot(world) == before
    assert time.perf_counter() - t0 < 30
