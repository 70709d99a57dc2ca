"""The failure contract of every CLI (docs/DESIGN.md "Failures"), table-driven: each bad input
exits 2 with exactly one line on stderr naming the thing, and changes no file anywhere.

The CLIs run in process (``main(argv)``); the only subprocess is the lock holder, since a POSIX
lock cannot conflict with its own process."""

from __future__ import annotations

import hashlib
import json
import os
import re
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
    _prepared_variants(root, data)
    (root / "hs_latin1.jsonl").write_bytes(b'{"ctx": "caf\xe9"}\n')
    (root / "hs_ok.jsonl").write_text(json.dumps({
        "ctx": "A man", "ctx_a": "A man", "ctx_b": "", "activity_label": "x", "endings": ["a", "b", "c", "d"], "label": 0}) + "\n")
    mine = root / "my_model"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}\n')
    (root / "empty_dir").mkdir()
    # Issue 19's inputs: YAML that expands, repeats a key or is empty; a damaged export; a corrupt
    # shard behind a matching header; an incomplete checkpoint; a file where tensorboard/ goes.
    # 346 bytes whose train.seed expands to 9**7 strings (the type error used to print all 39 MB of it)
    (root / "bomb.yaml").write_text("train:\n  seed:\n    - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"    - &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdef", "bcdefg")))
    (root / "dup.yaml").write_text("optim:\n  lr: 1.0e-3\n  lr: 3.0e-4\n")
    (root / "empty.yaml").write_text("")
    from pretrain.model import GPT, GPTConfig
    from pretrain.model.hf import export_hf

    export_hf(GPT(GPTConfig.from_preset("tiny")), root / "export_bad")  # GPT-2's vocabulary: exportable
    export_hf(GPT(GPTConfig.from_preset("tiny")), root / "export_ok")  # a model the GPT-2 tokenizer's ids fit
    shutil.copytree(root / "export_ok", root / "export_changed")  # weights changed in place since the export
    blob = bytearray((root / "export_changed" / "model.safetensors").read_bytes())
    blob[-100] ^= 0xFF
    (root / "export_changed" / "model.safetensors").write_bytes(bytes(blob))
    shutil.copytree(root / "export_ok", root / "export_uncovered")  # a record that leaves the weights out
    record = json.loads((root / "export_uncovered" / "gpt2_export.json").read_text())
    del record["files"]["model.safetensors"]
    (root / "export_uncovered" / "gpt2_export.json").write_text(json.dumps(record))
    weights = root / "export_bad" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-100] ^= 0xFF  # inside the tensor data: the header (and so every shape) stays intact
    weights.write_bytes(bytes(blob))
    corrupt = root / "data_corrupt"
    shutil.copytree(data, corrupt)
    from data_pipeline.shards import file_sha256, read_header

    (corrupt / "manifest.json").write_text(json.dumps({"shards": [  # what the shards held when prepared
        {"file": p.name, "split": p.name.split("_")[0], "tokens": read_header(p), "documents": 1,
         "sha256": file_sha256(p)} for p in sorted(corrupt.glob("*.bin"), key=lambda p: p.name[0] != "v")]}))
    with open(corrupt / "train_000000.bin", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"\xff" * 10)  # header and size as the manifest says; the content differs
    partial = root / "partial_ckpt"
    shutil.copytree(run / "checkpoints" / "step_00000004", partial)
    (partial / "COMMITTED").unlink()
    tb_file = root / "tb_file_run"
    tb_file.mkdir()
    (tb_file / "tensorboard").write_text("a file\n")
    from test_core import bad_bundles

    bad_bundles(root / "core")  # issue 31: CORE bundles missing a file, a baseline, ... (tests/test_core.py)
    _weak_variants(root, run, data)
    locked = root / "locked_run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pretrain.rundir.lock import RunDirLock; "
         f"RunDirLock({str(locked)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    yield root
    holder.kill()
    holder.wait()


def _prepared_variants(root: Path, data: Path) -> None:
    """data_incomplete: a prepare stopped part-way; data_outside: a manifest naming '../x.bin';
    prep_parts: task 1 of 3 only (a merge must wait); llmc_bad: an llm.c shard with a bad header."""
    from data_pipeline.shards import file_sha256

    settings = {"source": "docs.jsonl", "text_field": "text", "filters": [], "txt_per_line": False,
                "hf_config": None, "hf_split": "train", "data_files": None, "shard_tokens": 12000,
                "val_tokens": 4000, "max_tokens": None}
    names = ["val_000000.bin", "train_000000.bin", "train_000001.bin"]
    for name, complete, files in (("data_incomplete", False, names), ("data_outside", True, [*names, "../x.bin"])):
        d = root / name
        shutil.copytree(data, d)
        shards = [{"file": n, "split": "val" if n.startswith("val") else "train", "tokens": 12000 if "val" not in n else 4000,
                   "documents": 1, "sha256": file_sha256(d / n) if (d / n).is_file() else ""} for n in files]
        (d / "manifest.json").write_text(json.dumps({"complete": complete, "settings": settings, "shards": shards}))
    parts = root / "prep_parts"
    parts.mkdir()
    (parts / "manifest.task-00001-of-00003.json").write_text(json.dumps(
        {"complete": True, "settings": {**settings, "tasks": 3}, "shards": [], "totals": {}}))
    bad = root / "llmc_bad"
    bad.mkdir()
    for n in ("fw_val_000000.bin", "fw_train_000001.bin"):
        shutil.copy(data / "val_000000.bin", bad / n)
    (bad / "fw_train_000001.bin").write_bytes(b"\x00" * 8 + (bad / "fw_train_000001.bin").read_bytes()[8:])


def _weak_variants(root: Path, run: Path, data: Path) -> None:
    """Issue 29's inputs: a dangling tensorboard link, run directories whose config.yaml or
    eval.json is damaged, a manifest listing fewer shards than its totals, an edited export."""
    (root / "tb_link_run").mkdir()
    (root / "tb_link_run" / "tensorboard").symlink_to(root / "gone")
    (root / "tb_ro_run" / "tensorboard").mkdir(parents=True)  # made read-only in a mount namespace
    (root / "cache_full").mkdir()  # a tiny tmpfs is mounted here in a mount namespace
    os.mkfifo(root / "a_fifo")  # no writer: reading it would block
    for name in ("run_badcfg", "run_unknown", "run_badeval", "run_badstate"):
        shutil.copytree(run, root / name, ignore=shutil.ignore_patterns(".lock"))
    (root / "run_badcfg" / "config.yaml").write_text("optim: [1, 2\n")
    with open(root / "run_unknown" / "config.yaml", "a") as f:
        f.write("extra:\n  lrr: 1\n")
    (root / "run_badeval" / "eval.json").write_text('{"results": [1, 2]}\n')
    (root / "run_badstate" / "checkpoints" / "step_00000004" / "trainer_state.pt").write_bytes(b"PK\x03\x04 damaged")
    shutil.copytree(data, root / "data_badjson")
    (root / "data_badjson" / "manifest.json").write_text('{"shards": [')
    fewer = root / "data_fewer"
    shutil.copytree(data, fewer)
    from data_pipeline.shards import file_sha256, read_header

    shards = [{"file": p.name, "split": p.name.split("_")[0], "tokens": read_header(p), "documents": 1,
               "sha256": file_sha256(p)} for p in sorted(fewer.glob("*.bin"), key=lambda p: p.name[0] != "v")]
    (fewer / "manifest.json").write_text(json.dumps({"complete": True, "shards": shards[:-1],
                                                     "totals": {"val_shards": 1, "train_shards": 2}}))
    from lm_eval_fixtures import write_tasks

    write_tasks(root / "tasks")  # 12 examples per split; a copy whose arc task asks for 50 shots itself
    shutil.copytree(root / "tasks", root / "tasks_50shot")
    arc = root / "tasks_50shot" / "arc_easy_local.yaml"
    arc.write_text(re.sub(r"(?m)^num_fewshot: .*\n", "", arc.read_text()) + "num_fewshot: 50\n")
    shutil.copytree(data, root / "data_url")  # sound, with a manifest: read as file:// into a shard cache
    (root / "data_url" / "manifest.json").write_text(json.dumps({"complete": True, "shards": shards}))


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
    ("train: YAML aliases expanding without bound", "pretrain.train", lambda r: ["--config", str(r / "bomb.yaml")],
     "expands to more than"),
    ("train: a key given twice", "pretrain.train", lambda r: ["--config", str(r / "dup.yaml")], "given twice"),
    ("train: an empty config file", "pretrain.train", lambda r: ["--config", str(r / "empty.yaml")], "empty"),
    ("train: NaN value", "pretrain.train", lambda r: _train(r, "new", **{"optim.weight_decay": "nan"}),
     "optim.weight_decay=nan must be a finite number"),
    ("train: a seed beyond 64 bits", "pretrain.train",
     lambda r: _train(r, "new", **{"train.seed": 99999999999999999999999}), "train.seed=99999999999999999999999 must be"),
    ("train: a negative data.seed", "pretrain.train", lambda r: _train(r, "new", **{"data.seed": -1}),
     "data.seed=-1 must be an integer in [0, 2**63)"),
    ("train: a section given a value", "pretrain.train", lambda r: _train(r, "new") + ["optim=1"],
     "'optim' is a section, not a key"),
    ("train: an empty data.dir", "pretrain.train", lambda r: _train(r, "new", **{"data.dir": ""}), "data.dir is empty"),
    ("train: LR warmup longer than the run", "pretrain.train", lambda r: _train(r, "new", **{"schedule.warmup_steps": 9}),
     "schedule.warmup_steps=9"),
    ("train: batch warmup longer than the run", "pretrain.train",
     lambda r: _train(r, "new", **{"schedule.batch_warmup_steps": 9, "schedule.batch_warmup_start_tokens": 128}),
     "schedule.batch_warmup_steps=9"),
    ("train: overwrite with resume auto", "pretrain.train", lambda r: _train(r, **{"checkpoint.overwrite": "true"}),
     "checkpoint.overwrite=true"),
    ("train: tensorboard/ is a file", "pretrain.train",
     lambda r: _train(r, "tb_file_run", **{"logging.tensorboard": "true"}), "is a file"),
    ("train: device cuda without CUDA", "pretrain.train", lambda r: _train(r, "new", **{"train.device": "cuda"}),
     "train.device=cuda"),
    ("train: resume an AdamW checkpoint with Muon", "pretrain.train", lambda r: _train(r, **{"optim.name": "muon"}),
     "optim.name=adamw"),
    ("train: resume a one-process checkpoint with FSDP", "pretrain.train",
     lambda r: _train(r, **{"distributed.mode": "fsdp"}), "without FSDP"),
    ("train: overwrite refused for a corrupt shard", "pretrain.train",
     lambda r: _train(r, data="data_corrupt", **{"checkpoint.overwrite": "true"}) + ["--resume", "none"],
     "nothing was moved aside"),
    ("train: init_from a damaged export", "pretrain.train",
     lambda r: _train(r, "new", **{"model.init_from": str(r / "export_bad")}),
     "content does not match"),
    ("train: init_from an incomplete checkpoint", "pretrain.train",
     lambda r: _train(r, "new", **{"model.init_from": str(r / "partial_ckpt")}), "incomplete"),
    ("eval: a damaged export", "evals.run",
     lambda r: ["--model", str(r / "export_bad"), "--no-hellaswag", "--val-data", str(r / "data")],
     "content does not match"),
    ("eval: --seq-len beyond the context", "evals.run",
     lambda r: ["--model", str(r / "run"), "--no-hellaswag", "--val-data", str(r / "data"), "--seq-len", "999",
                "--device", "cpu"],
     "--seq-len 999"),
    ("eval: --val-tokens beyond the split", "evals.run",
     lambda r: ["--model", str(r / "run"), "--no-hellaswag", "--val-data", str(r / "data"), "--val-tokens",
                "99999999"], "lower --val-tokens"),
    ("export: an incomplete checkpoint", "pretrain.export",
     lambda r: ["export", "--checkpoint", str(r / "partial_ckpt"), "--out", str(r / "export2")], "incomplete"),
    ("generate: a damaged export", "pretrain.inference.generate", lambda r: ["--model", str(r / "export_bad")],
     "content does not match"),
    ("generate: --temperature nan", "pretrain.inference.generate",
     lambda r: ["--model", str(r / "run" / "checkpoints"), "--temperature", "nan"], "temperature"),
    ("prepare: missing source", "data_pipeline.prepare",
     lambda r: [str(r / "nope.txt"), str(r / "prep_out"), "--no-progress"], "nope.txt"),
    ("train: a prepare stopped part-way", "pretrain.train", lambda r: _train(r, "new", "data_incomplete"),
     "finish it with: gpt2-prepare docs.jsonl"),
    ("train: manifest names ../x.bin", "pretrain.train", lambda r: _train(r, "new", "data_outside"),
     "'../x.bin' points outside"),
    ("train: data.dir a URL without data.cache_dir", "pretrain.train",
     lambda r: _train(r, "new") + [f"data.dir=memory://{r.name}/x"], "data.cache_dir"),
    ("prepare: OUT_DIR is a file", "data_pipeline.prepare",
     lambda r: [str(r / "hs_ok.jsonl"), str(r / "a_file"), "--no-progress"], "is not a directory"),
    ("prepare: OUT_DIR under a file", "data_pipeline.prepare",
     lambda r: [str(r / "hs_ok.jsonl"), str(r / "a_file" / "out"), "--no-progress"], "a_file is a file"),
    ("prepare: --merge before every task is complete", "data_pipeline.prepare",
     lambda r: ["--merge", str(r / "prep_parts")], "tasks 0, 2 missing"),
    ("prepare: --index a shard with a bad header", "data_pipeline.prepare",
     lambda r: ["--index", str(r / "llmc_bad")], "fw_train_000001.bin: bad magic 0"),
    ("eval: --limit 0", "evals.run",
     lambda r: ["--model", str(r / "run"), "--hellaswag", str(r / "hs_ok.jsonl"), "--limit", "0"], "--limit"),
    ("eval: non-UTF-8 HellaSwag", "evals.run",
     lambda r: ["--model", str(r / "run"), "--hellaswag", str(r / "hs_latin1.jsonl"), "--device", "cpu"],
     "hs_latin1.jsonl:1"),
    *[(f"eval: --hellaswag a {what}", "evals.run",
       lambda r, name=name: ["--model", str(r / "run"), "--hellaswag", str(r / name), "--device", "cpu"], needle)
      for what, name, needle in (("directory", "empty_dir", "empty_dir: is a directory, not a HellaSwag"),
                                 ("FIFO", "a_fifo", "a_fifo: is a FIFO, socket or device"))],
    ("eval: missing HellaSwag file", "evals.run",
     lambda r: ["--model", str(r / "run"), "--hellaswag", str(r / "nope.jsonl")], "nope.jsonl"),
    ("eval: --out under a file", "evals.run",
     lambda r: ["--model", str(r / "run"), "--no-hellaswag", "--val-data", str(r / "data"),
                "--out", str(r / "a_file" / "x.json")], "a_file"),
    ("eval: not a model", "evals.run",
     lambda r: ["--model", str(r / "empty_dir"), "--hellaswag", str(r / "hs_ok.jsonl"), "--device", "cpu"],
     "empty_dir"),
    ("export: --out holds the user's own config.json", "pretrain.export",
     lambda r: ["export", "--checkpoint", str(r / "run" / "checkpoints"), "--out", str(r / "my_model")],
     "my_model"),
    ("export: not a model", "pretrain.export",
     lambda r: ["export", "--checkpoint", str(r / "empty_dir"), "--out", str(r / "export")], "empty_dir"),
    ("generate: not a model", "pretrain.inference.generate", lambda r: ["--model", str(r / "empty_dir")], "empty_dir"),
    ("serve: not a model", "pretrain.serve.main", lambda r: ["--model", str(r / "empty_dir")], "empty_dir"),
    ("serve: --max-batch 0", "pretrain.serve.main",
     lambda r: ["--model", str(r / "run" / "checkpoints"), "--max-batch", "0"], "--max-batch"),
    ("generate: --num-samples 0", "pretrain.inference.generate",
     lambda r: ["--model", str(r / "run" / "checkpoints"), "--num-samples", "0"], "--num-samples"),
    ("generate: missing --prompts-file", "pretrain.inference.generate",
     lambda r: ["--model", str(r / "run" / "checkpoints"), "--prompts-file", str(r / "nope.txt")], "nope.txt"),
    ("generate: non-UTF-8 --prompts-file", "pretrain.inference.generate",
     lambda r: ["--model", str(r / "run" / "checkpoints"), "--prompts-file", str(r / "hs_latin1.jsonl")],
     "hs_latin1.jsonl"),
    ("generate: --batch-size 0", "pretrain.inference.generate",
     lambda r: ["--model", str(r / "run" / "checkpoints"), "--batch-size", "0"], "--batch-size"),
    ("generate: --device cuda without CUDA", "pretrain.inference.generate",
     lambda r: ["--model", str(r / "run" / "checkpoints"), "--device", "cuda"], "--device cuda"),
    ("eval: --device cuda without CUDA", "evals.run",
     lambda r: ["--model", str(r / "run"), "--no-hellaswag", "--device", "cuda"], "--device cuda"),
    ("plot: --out under a file", "pretrain.plot",
     lambda r: [str(r / "run"), "--out", str(r / "a_file" / "loss.png")], "a_file"),
    ("plot: no metrics", "pretrain.plot", lambda r: [str(r / "empty_dir")], "empty_dir"),
    ("report: not a run directory", "pretrain.report", lambda r: [str(r / "empty_dir")], "empty_dir"),
    ("eval: --include-path without --tasks", "evals.run",
     lambda r: ["--model", str(r / "run"), "--include-path", str(r / "empty_dir")], "--tasks"),
    ("eval: unknown harness task", "evals.run",
     lambda r: ["--model", str(r / "run"), "--tasks", "no_such_task", "--include-path", str(r / "empty_dir")],
     "no_such_task"),
    # issue 29: bad input that ended in a traceback, exit 1, or several lines
    ("train: --config /dev/zero", "pretrain.train", lambda r: ["--config", "/dev/zero"], "more than"),
    ("train: an unknown option", "pretrain.train", lambda r: ["--bogus"], "--bogus"),
    ("train: tensorboard/ a dangling link", "pretrain.train",
     lambda r: _train(r, "tb_link_run", **{"logging.tensorboard": "true"}), "tensorboard"),
    ("train: a manifest listing fewer shards than its totals", "pretrain.train",
     lambda r: _train(r, "new", "data_fewer"), "but its totals say 2"),
    ("train: a damaged manifest (its advice must not lead to a refusal)", "pretrain.train",
     lambda r: _train(r, "new", "data_badjson"), "prepare again into a new OUT_DIR"),
    ("train: data.dir a URL that cannot be reached", "pretrain.train",
     lambda r: _train(r, "new", **{"data.dir": "https://127.0.0.1:9/data", "data.cache_dir": str(r / "cache")}),
     "cannot read it"),
    ("train: unreadable trainer state (the advice must not restart from step 1)", "pretrain.train",
     lambda r: _train(r, "run_badstate", **{"schedule.max_steps": 8}), "model.init_from="),
    ("generate: --prompts-file /dev/zero", "pretrain.inference.generate",
     lambda r: ["--model", str(r / "export_ok"), "--prompts-file", "/dev/zero"], "more than"),
    ("generate: non-UTF-8 --stop", "pretrain.inference.generate",
     lambda r: ["--model", str(r / "export_ok"), "--stop", "caf\udce9"], "--stop"),
    ("generate: --step graph on a CPU", "pretrain.inference.generate",
     lambda r: ["--model", str(r / "export_ok"), "--step", "graph", "--device", "cpu"], "--step graph"),
    ("generate: --num-samples not a number", "pretrain.inference.generate",
     lambda r: ["--model", str(r / "export_ok"), "--num-samples", "x"], "--num-samples"),
    ("eval: --num-fewshot -1", "evals.run",
     lambda r: ["--model", str(r / "run"), "--tasks", "x", "--num-fewshot", "-1"], "--num-fewshot"),
    *[(f"eval: --num-fewshot {k}, beyond {task}'s few-shot examples", "evals.run",
       lambda r, k=k, task=task: ["--model", str(r / "export_ok"), "--no-hellaswag", "--tasks", task, "--include-path",
                                  str(r / "tasks"), "--num-fewshot", k, "--device", "cpu"], needle)
      for k, task, needle in (("13", "arc_easy_local", "has 12 few-shot example(s); pass --num-fewshot 12 or fewer"),
                              ("99999999999999999999", "arc_easy_local", "pass --num-fewshot 12 or fewer"),
                              ("12", "nq_open_local", "less the one scored; pass --num-fewshot 11 or fewer"))],
    ("eval: a task YAML's own num_fewshot beyond its examples", "evals.run",
     lambda r: ["--model", str(r / "export_ok"), "--no-hellaswag", "--tasks", "arc_easy_local", "--include-path",
                str(r / "tasks_50shot"), "--device", "cpu"], "asks for num_fewshot 50 (its YAML)"),
    ("eval: an unknown option", "evals.run", lambda r: ["--model", str(r / "run"), "--bogus"], "--bogus"),
    ("export: a run whose config.yaml does not parse", "pretrain.export",
     lambda r: ["export", "--checkpoint", str(r / "run_badcfg" / "checkpoints"), "--out", str(r / "export3")],
     "config.yaml"),
    ("export: no subcommand", "pretrain.export", lambda r: [], "required: command"),
    ("report: config.yaml with an unknown section", "pretrain.report", lambda r: [str(r / "run_unknown")], "extra"),
    ("report: malformed eval.json", "pretrain.report", lambda r: [str(r / "run_badeval")], "eval.json"),
    ("report: no RUN_DIR", "pretrain.report", lambda r: [], "RUN_DIR"),
    ("plot: --out a directory", "pretrain.plot", lambda r: [str(r / "run"), "--out", str(r / "empty_dir")],
     "empty_dir: is a directory"),
    ("plot: --out an image format matplotlib lacks", "pretrain.plot",
     lambda r: [str(r / "run"), "--out", str(r / "loss.txt")], "cannot write .txt images"),
    ("serve: --max-batch beyond memory", "pretrain.serve.main",
     lambda r: ["--model", str(r / "run" / "checkpoints"), "--max-batch", "99999999999", "--device", "cpu", "--port", "0"],
     "does not fit in cpu memory; lower --max-batch"),
    ("plot: an unknown option", "pretrain.plot", lambda r: [str(r / "run"), "--bogus"], "--bogus"),
    ("prepare: --workers not a number", "data_pipeline.prepare",
     lambda r: [str(r / "hs_ok.jsonl"), str(r / "prep_out"), "--workers", "x"], "--workers"),
    ("export: re-export over weights changed since, without --overwrite", "pretrain.export",
     lambda r: ["export", "--checkpoint", str(r / "export_ok"), "--out", str(r / "export_changed")],
     "model.safetensors: changed since gpt2-export wrote it"),
    ("generate: an export record that leaves the weights out", "pretrain.inference.generate",
     lambda r: ["--model", str(r / "export_uncovered")], "but not model.safetensors"),
    ("export: --push-to-hub not OWNER/NAME", "pretrain.export",
     lambda r: ["export", "--checkpoint", str(r / "run" / "checkpoints"), "--out", str(r / "export"),
                "--push-to-hub", "no-slash"], "--push-to-hub"),
    *[(f"eval: CORE bundle, {what}", "evals.run",
       lambda r, d=d: ["--model", str(r / "run"), "--core", str(r / "core" / d), "--device", "cpu"], needle)
      for what, d, needle in (
          ("missing", "no_bundle", "no such bundle directory"),
          ("missing task file", "missing_file", "t.jsonl: task file not found"),
          ("unknown task type", "unknown_type", "icl_task_type 'ranking'"),
          ("baseline missing from the csv", "no_baseline", "no 'Random baseline' for task 't'"),
          ("gold out of range", "bad_gold", "'gold' must be an index into 'choices'"),
          ("malformed jsonl", "bad_json", "t.jsonl:4: not valid JSON"))],
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
    try:
        rc = importlib.import_module(module).main(argv(world))
    except SystemExit as e:  # argparse's refusals
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prog = {"pretrain.train": "gpt2-train", "data_pipeline.prepare": "gpt2-prepare", "evals.run": "gpt2-eval",
            "pretrain.export": "gpt2-export", "pretrain.inference.generate": "gpt2-generate", "pretrain.plot": "gpt2-plot",
            "pretrain.report": "gpt2-report", "pretrain.serve.main": "gpt2-serve"}[module]
    assert lines[0].startswith(f"{prog}: error"), lines[0]
    assert needle in lines[0], lines[0]
    assert "resume with --resume PATH" not in lines[0]  # the advice fits every command that reads a checkpoint
    assert len(re.sub(r"/\S+", "PATH", lines[0])) <= 300, lines[0]  # each path counted as one word
    assert snapshot(world) == before
    assert time.perf_counter() - t0 < 5


# Bad input that needs a file system of its own: a read-only mount, a permission the caller lacks
# (as root too: CAP_DAC_OVERRIDE dropped, so a mode binds), a full disk. Each runs the CLI in a child
# in a private mount namespace (unshare --mount; the mounts vanish with it, nothing outside changes):
# (id, module with main(argv), shell that prepares the namespace from the root, argv, needle).
def _ro(d: str) -> str:
    return f"mount --bind {d} {d} && mount -o remount,bind,ro {d}"


CONFINED = [
    ("train: tensorboard/ on a read-only file system (EROFS)", "pretrain.train",
     lambda r: _ro(r / "tb_ro_run" / "tensorboard"), lambda r: _train(r, "tb_ro_run", **{"logging.tensorboard": "true"}),
     "is on a read-only file system"),
    ("train: tensorboard/ not writable by this user (EACCES)", "pretrain.train",
     lambda r: f"mount -t tmpfs -o size=64k,mode=0555 tmpfs {r / 'tb_ro_run' / 'tensorboard'}",
     lambda r: _train(r, "tb_ro_run", **{"logging.tensorboard": "true"}), "not writable by this user"),
    ("train: run_dir on a read-only file system", "pretrain.train", lambda r: _ro(r / "tb_ro_run"),
     lambda r: _train(r, "tb_ro_run"), "is on a read-only file system"),
    ("train: the shard cache's disk is full", "pretrain.train",
     lambda r: f"mount -t tmpfs -o size=8k tmpfs {r / 'cache_full'}",
     lambda r: _train(r, "new", **{"data.dir": f"file://{r / 'data_url'}", "data.cache_dir": str(r / "cache_full")}),
     "free space there or set data.cache_dir"),
]


def _confined_child(setup: str, module: str, argv: list[str], listed: Path | None) -> list[str]:
    """The command line of the child: the namespace's mounts, then the CLI (its own seconds, after
    its module is imported, as the in-process rows count them), then what ``listed`` holds inside
    the namespace (a JSON list)."""
    code = (f"import importlib, json, os, sys, time; cli = importlib.import_module({module!r}); "
            "t0 = time.perf_counter(); rc = cli.main(json.loads(sys.argv[1])); "
            "print(time.perf_counter() - t0); "
            f"d = {str(listed) if listed else ''!r}; "
            "print(json.dumps(sorted(os.listdir(d)) if d else [])); sys.exit(rc)")
    # without CAP_DAC_OVERRIDE a directory's mode binds root as it binds anyone else
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{setup} && exec "$@"', "sh",
            "setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--",
            sys.executable, "-c", code, json.dumps(argv)]


@pytest.mark.parametrize("case", CONFINED, ids=[c[0] for c in CONFINED])
def test_bad_input_on_a_confined_file_system_exits_2(world, case):
    name, module, setup, argv, needle = case
    if shutil.which("setpriv") is None or subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("unshare --mount (or setpriv) is not permitted here: no private mount namespace")
    listed = world / "cache_full" if "cache" in name else None
    before = snapshot(world)
    proc = subprocess.run(_confined_child(setup(world), module, argv(world), listed), cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpt2-train: error") and needle in lines[0], lines[0]
    assert len(re.sub(r"/\S+", "PATH", lines[0])) <= 300, lines[0]
    seconds, inside = proc.stdout.strip().splitlines()[-2:]
    assert float(seconds) < 5
    assert not [n for n in json.loads(inside) if ".tmp" in n or n.endswith(".bin")]  # nothing half-written
    assert snapshot(world) == before


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _second_batch_interrupts(monkeypatch) -> None:
    """gpt2-generate's decode finishes its first batch, then a Ctrl-C arrives during the second."""
    import pretrain.inference.generate as g

    real, calls = g._decode_batch, []

    def decode(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(g, "_decode_batch", decode)


# Ctrl-C in each of the seven commands, through its console script (pyproject.toml): (id, the
# script's function, argv, where the Ctrl-C lands (module, attribute) or a patcher, the needle).
CTRL_C = [
    ("train", "pretrain.train:cli", lambda r: _train(r, **{"schedule.max_steps": 8}),
     ("pretrain.training.build", "build_trainer"), "resume with: gpt2-train"),
    ("eval", "evals.run:cli", lambda r: ["--model", str(r / "run"), "--no-hellaswag", "--val-data", str(r / "data")],
     ("pretrain.model.weights", "load_model"), "no results were written"),
    ("prepare", "pretrain.cli:prepare", lambda r: [str(r / "hs_ok.jsonl"), str(r / "a_file"), "--no-progress"],
     ("data_pipeline.prepare", "build_parser"), "rerun the same command"),
    ("prepare --merge", "pretrain.cli:prepare", lambda r: ["--merge", str(r / "prep_parts")],
     ("data_pipeline.tasks", "merge"), "rerun gpt2-prepare --merge"),
    ("export", "pretrain.cli:export",
     lambda r: ["export", "--checkpoint", str(r / "run" / "checkpoints"), "--out", str(r / "export_ctrl_c")],
     ("pretrain.export", "load_model"), "rerun the same command"),
    ("generate", "pretrain.cli:generate",
     lambda r: ["--model", str(r / "export_ok"), "--num-samples", "2", "--batch-size", "1",
                "--max-new-tokens", "3", "--device", "cpu"],
     _second_batch_interrupts, "printed the 1 of 2 samples that were finished"),
    ("plot", "pretrain.cli:plot", lambda r: [str(r / "run"), "--out", str(r / "plot_ctrl_c.png")],
     ("pretrain.plot", "plot_runs"), "rerun the same command"),
    ("report", "pretrain.cli:report", lambda r: [str(r / "run")], ("pretrain.report", "render"),
     "rerun the same command"),
]


@pytest.mark.parametrize("case", CTRL_C, ids=[c[0] for c in CTRL_C])
def test_ctrl_c_exits_130_with_one_line_and_changes_nothing(world, case, capsys, monkeypatch):
    import importlib

    name, script, argv, where, needle = case
    module, func = script.split(":")
    entry = getattr(importlib.import_module(module), func)
    if callable(where):
        where(monkeypatch)
    else:
        monkeypatch.setattr(importlib.import_module(where[0]), where[1], _interrupt)
    monkeypatch.setattr(sys, "argv", [name, *argv(world)])
    before = snapshot(world)
    capsys.readouterr()
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        entry()
    out, err = capsys.readouterr()
    assert e.value.code == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gpt2-{name.split()[0]}: ") and needle in lines[0], err
    said = lines[0].split("resume with: ")[0]  # the command that resumes is the user's own, of any length
    assert "Traceback" not in err and len(re.sub(r"/\S+", "PATH", said)) <= 300
    if name == "generate":  # the sample finished before the Ctrl-C is printed
        assert "--- sample 1/2 ---" in out and "sample 2/2" not in out

    def content(snap):  # a run's lock file is taken and released again (its mtime moves; it stays empty)
        return {k: v.split(":")[0] if k.endswith(".lock") else v for k, v in snap.items()}

    assert content(snapshot(world)) == content(before)
    assert time.perf_counter() - t0 < 5
