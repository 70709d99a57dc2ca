"""gpt2-prepare at cluster scale: --tasks N (independent, resumable tasks) + --merge, --local, and
--index for llm.c shards made by other tools. The merged / indexed directory is read by the trainer
like a single prepare's."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO

from data_pipeline.prepare import main
from data_pipeline.shards import read_shard
from data_pipeline.tokenizer import EOT_ID, gpt2_encoding

WORDS = "the of and to in is was for on that with as by at data model school naïve 数据 😀".split()
COMMON = ["--shard-tokens", "1000", "--val-tokens", "1500", "--workers", "1", "--no-progress", "--chunk-chars", "3000"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Five files in sorted order: parquet (4 row groups each; the first file too) and JSON lines,
    some empty rows."""
    d = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    texts = []
    for f in range(5):
        rows = [{"text": " ".join(rng.choice(WORDS, int(rng.integers(5, 200)))) if rng.random() > 0.1 else ""}
                for _ in range(40)]
        texts += [r["text"] for r in rows if r["text"]]
        if f % 2 == 0:
            pq.write_table(pa.Table.from_pylist(rows), d / f"f{f}.parquet", row_group_size=10)
        else:
            (d / f"f{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d, texts


def tasks_run(src: Path, out: Path, n: int, *extra: str) -> None:
    for i in range(n):
        assert main([str(src), str(out), "--tasks", str(n), "--task-id", str(i), *COMMON, *extra]) == 0
    assert main(["--merge", str(out)]) == 0


def documents(out: Path) -> tuple[list[tuple], list[tuple], dict]:
    """(validation documents in order, training documents, manifest): each task's stream of a
    split, cut at every EOT."""
    man = json.loads((out / "manifest.json").read_text())
    split_docs = {}
    for split in ("val", "train"):
        streams: dict[int, list[np.ndarray]] = {}
        for s in man["shards"]:
            if s["split"] == split:
                streams.setdefault(s.get("task", 0), []).append(np.asarray(read_shard(out / s["file"])))
        docs = []
        for t in sorted(streams):
            a = np.concatenate(streams[t])
            assert a[0] == EOT_ID
            docs += [tuple(x) for x in np.split(a, np.flatnonzero(a == EOT_ID))[1:]]
        split_docs[split] = docs
    return split_docs["val"], split_docs["train"], man


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("val_tokens", [1500, 3000, 10**6], ids=["val-in-a-row-group", "val-spans-row-groups",
                                                                   "all-of-the-first-file"])
def test_tasks_1_3_and_7_hold_the_same_documents_and_validation(source, tmp_path, val_tokens):
    """The same multiset of documents and the same validation documents, in the same order, for any
    number of tasks (7 > 5 files: units are parquet row groups, and the first file's are spread over
    tasks 0-3); validation = the first whole documents of the first file holding >= --val-tokens
    tokens (all of it if it holds fewer), as an independent tokenization says."""
    src, texts = source
    enc = gpt2_encoding()
    ref = [tuple([EOT_ID, *enc.encode_ordinary(t)]) for t in texts]
    first_file = sum(1 for r in pq.read_table(src / "f0.parquet").to_pylist() if r["text"])
    cum = np.cumsum([len(d) for d in ref])
    k = min(int(np.searchsorted(cum, val_tokens)) + 1, first_file)
    got = {}
    for n in (1, 3, 7):
        tasks_run(src, tmp_path / f"n{n}", n, "--val-tokens", str(val_tokens))
        got[n] = documents(tmp_path / f"n{n}")
    for n, (val, train, man) in got.items():
        assert val == ref[:k], n
        assert sorted(train) == sorted(ref[k:]), n
        assert man["complete"] and man["tasks"] == n and man["totals"]["val_tokens"] == int(cum[k - 1])
        assert man["totals"]["documents"] == len(ref) and man["totals"]["rows_read"] == 200
    assert got[7][2]["source"]["unit"] == "parquet row group" and got[3][2]["source"]["unit"] == "file"


def test_merged_dataset_trains_resumes_and_verifies(source, tmp_path, capsys):
    from pretrain.train import main as train

    src, _ = source
    out = tmp_path / "out"
    tasks_run(src, out, 3, "--val-tokens", "1500")
    assert main(["--verify", str(out)]) == 0
    over = ["model.preset=tiny", f"data.dir={out}", "data.seq_len=16", "train.global_batch_tokens=64",
            "train.micro_batch_size=2", "train.compile=false", "train.dtype=fp32", "train.device=cpu",
            f"train.run_dir={tmp_path / 'run'}", "schedule.warmup_steps=1", "eval.interval=2",
            "eval.val_tokens=64", "eval.hellaswag=false", "eval.sample_prompt=", "checkpoint.interval=2"]
    assert train([*over, "schedule.max_steps=2"]) == 0
    assert train([*over, "schedule.max_steps=4"]) == 0
    said = capsys.readouterr().out
    assert "resumed from" in said and "val" in said
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    once = [x.replace(str(tmp_path / "run"), str(tmp_path / "once")) for x in over]
    assert train([*once, "schedule.max_steps=4"]) == 0  # uninterrupted: the resumed run's losses, exactly
    ref = [json.loads(x) for x in (tmp_path / "once" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in ref if "loss" in r]
    # A corrupt shard of task 2 names task 2's own command.
    man = json.loads((out / "manifest.json").read_text())
    victim = next(s for s in man["shards"] if s.get("task") == 2)
    with open(out / victim["file"], "r+b") as f:
        f.seek(1100)
        f.write(b"\xff\xff")
    assert main(["--verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert victim["file"] in err and "--tasks 3 --task-id I" in err


def test_killed_task_reruns_byte_identical_and_merge_waits_for_it(source, tmp_path, capsys):
    src, _ = source
    args = [str(src), "--tasks", "3", "--task-id", "1", *COMMON, "--shard-tokens", "500", "--val-tokens", "1500"]
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert main([args[0], str(clean), *args[1:]]) == 0
    for i in (0, 2):
        assert main([str(src), str(out), "--tasks", "3", "--task-id", str(i), *COMMON, "--shard-tokens", "500",
                     "--val-tokens", "1500"]) == 0
    part = out / "manifest.task-00001-of-00003.json"
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.prepare", args[0], str(out), *args[1:]], cwd=REPO,
                            env=dict(os.environ, GPT2_PREPARE_TEST_SLEEP="0.3"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if len(json.loads(part.read_text())["shards"]) >= 2:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        assert proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not json.loads(part.read_text())["complete"]
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(["--merge", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task 1 incomplete (of 3)" in err[0] and "--task-id 1" in err[0], err
    assert snapshot(tmp_path) == before  # the refused merge wrote nothing
    assert main([args[0], str(out), *args[1:]]) == 0  # the rerun resumes
    mine = sorted(p.name for p in clean.iterdir())
    assert mine and all(p.startswith(("train_t00001", "manifest.task-00001")) for p in mine)
    assert {n: (clean / n).read_bytes() for n in mine} == {n: (out / n).read_bytes() for n in mine}
    assert not list(out.glob(".*tmp*"))
    assert main(["--merge", str(out)]) == 0


@pytest.mark.parametrize("argv, needle", [
    (lambda s, o: ["--merge", str(o / "nothing")], "not a local directory"),
    (lambda s, o: [str(s), str(o), "--tasks", "3", "--task-id", "3"], "--task-id in 0 .. tasks-1"),
    (lambda s, o: [str(s), str(o), "--tasks", "2"], "go together"),
    (lambda s, o: [str(s), str(o), "--tasks", "2", "--task-id", "0", "--max-tokens", "9"], "--max-tokens"),
    (lambda s, o: [str(s), str(o), "--tasks", "50", "--task-id", "0"], "only 14 units"),
    (lambda s, o: ["builtin:python-docs", str(o), "--tasks", "2", "--task-id", "0"], "cannot be split"),
    (lambda s, o: [str(s / "f0.jsonl"), str(o / "single")], "prepare split into tasks"),
], ids=["merge-no-dir", "task-id-range", "tasks-without-id", "max-tokens", "too-many-tasks", "builtin",
        "single-into-tasks-dir"])
def test_task_refusals_are_one_line_and_write_nothing(source, tmp_path, capsys, argv, needle):
    src, _ = source
    out = tmp_path / "o"
    assert main([str(src), str(out / "single"), "--tasks", "2", "--task-id", "0", *COMMON]) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main([*argv(src, out), *COMMON]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpt2-prepare: error: ") and needle in err[0], err
    assert snapshot(tmp_path) == before


def test_merge_refuses_missing_tasks_and_mixed_runs(source, tmp_path, capsys):
    src, _ = source
    out = tmp_path / "o"
    assert main([str(src), str(out), "--tasks", "3", "--task-id", "2", *COMMON]) == 0
    capsys.readouterr()
    assert main(["--merge", str(out)]) == 2
    line = capsys.readouterr().err.strip()
    assert "tasks 0, 1 missing (of 3)" in line and "--tasks 3 --task-id I" in line and "\n" not in line
    # A task run with other arguments into the same directory is refused before it writes.
    assert main([str(src), str(out), "--tasks", "3", "--task-id", "0", *COMMON, "--shard-tokens", "999"]) == 2
    assert "other arguments (shard_tokens: 1000 here 999)" in capsys.readouterr().err
    assert main([str(src), str(out), "--tasks", "4", "--task-id", "0", *COMMON]) == 2
    assert "another number of tasks" in capsys.readouterr().err
    # A shard that went missing after its task completed: named, with the task's command.
    for i in (0, 1):
        assert main([str(src), str(out), "--tasks", "3", "--task-id", str(i), *COMMON]) == 0
    (out / "train_t00001_000000.bin").unlink()
    capsys.readouterr()
    assert main(["--merge", str(out)]) == 2
    line = capsys.readouterr().err.strip()
    assert "train_t00001_000000.bin: missing" in line and "--task-id 1" in line
    assert not (out / "manifest.json").exists()


def test_local_runs_every_task_then_merges_like_an_array(source, tmp_path):
    src, _ = source
    tasks_run(src, tmp_path / "array", 3, "--val-tokens", "2000")
    assert main([str(src), str(tmp_path / "local"), "--tasks", "3", "--local", *COMMON, "--val-tokens", "2000",
                 "--workers", "3"]) == 0
    names = sorted(p.name for p in (tmp_path / "array").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "local").iterdir())
    assert all((tmp_path / "array" / n).read_bytes() == (tmp_path / "local" / n).read_bytes() for n in names)


# ---- --index: shards another tool made ------------------------------------------------------------
def write_datafile(filename: Path, toks) -> None:
    """llm.c's dev/data/data_common.py write_datafile (GPT-2 tokens, version 1), as it stands."""
    assert len(toks) < 2**31, "token count too large"
    header = np.zeros(256, dtype=np.int32)
    header[0] = 20240520  # magic
    header[1] = 1  # version
    header[2] = len(toks)
    toks_np = np.array(toks, dtype=np.uint16)
    with open(filename, "wb") as f:
        f.write(header.tobytes())
        f.write(toks_np.tobytes())


@pytest.fixture
def llmc_dir(tmp_path):
    """Shards as llm.c's fineweb.py writes them: documents of a toy language (ids < 512) after an EOT."""
    d = tmp_path / "edu_fineweb10B"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [("edufineweb_val_000000.bin", 3000), ("edufineweb_train_000001.bin", 5000),
                    ("edufineweb_train_000002.bin", 5000), ("edufineweb_train_000003.bin", 1234)]:
        toks = rng.integers(0, 512, n)
        toks[:: 97] = EOT_ID
        write_datafile(d / name, toks.tolist())
    return d


def test_index_llmc_shards_then_train_on_them(llmc_dir, tmp_path, capsys):
    from pretrain.train import main as train

    assert main(["--index", str(llmc_dir)]) == 0
    man = json.loads((llmc_dir / "manifest.json").read_text())
    assert [(s["file"], s["split"]) for s in man["shards"]] == [
        ("edufineweb_val_000000.bin", "val"), ("edufineweb_train_000001.bin", "train"),
        ("edufineweb_train_000002.bin", "train"), ("edufineweb_train_000003.bin", "train")]
    s1 = man["shards"][1]
    assert s1["sha256"] == hashlib.sha256((llmc_dir / s1["file"]).read_bytes()).hexdigest()
    assert s1["documents"] == len(range(0, 5000, 97)) and s1["max_token_id"] == EOT_ID
    assert man["complete"] and main(["--verify", str(llmc_dir)]) == 0
    assert main(["--index", str(llmc_dir)]) == 0  # re-indexing: the same manifest
    assert json.loads((llmc_dir / "manifest.json").read_text()) == man
    # The trainer reads them like its own (GPT-2 vocabulary: the EOT id 50256 is in range).
    over = ["model.preset=tiny", f"data.dir={llmc_dir}", "data.seq_len=16", "train.global_batch_tokens=64",
            "train.micro_batch_size=2", "train.compile=false", "train.dtype=fp32", "train.device=cpu",
            f"train.run_dir={tmp_path / 'run'}", "schedule.warmup_steps=1", "schedule.max_steps=2",
            "eval.interval=2", "eval.val_tokens=64", "eval.hellaswag=false", "eval.sample_prompt="]
    assert train(over) == 0
    assert "val/loss" in (tmp_path / "run" / "metrics.jsonl").read_text()
    capsys.readouterr()


@pytest.mark.parametrize("damage, needle", [
    (lambda p: p.write_bytes(b"\x00" * 4 + p.read_bytes()[4:]), "bad magic 0"),
    (lambda p: p.write_bytes(p.read_bytes()[:-7]), "header says"),
    (lambda p: write_datafile(p, [5, 7, 50257, 9]), "token id 50257 at position 2"),
], ids=["header", "size", "token-range"])
def test_index_refuses_a_bad_shard_in_one_line_writing_nothing(llmc_dir, tmp_path, capsys, damage, needle):
    damage(llmc_dir / "edufineweb_train_000002.bin")
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(["--index", str(llmc_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "edufineweb_train_000002.bin" in err[0] and needle in err[0], err
    assert snapshot(tmp_path) == before


def test_index_needs_validation_shards_named(llmc_dir, capsys):
    assert main(["--index", str(llmc_dir), "--val-glob", "*_valid_*"]) == 2
    assert "--val-glob" in capsys.readouterr().err
    assert not (llmc_dir / "manifest.json").exists()
