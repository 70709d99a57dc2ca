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

import faults
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


def streams(out: Path) -> tuple[dict[str, dict[int, np.ndarray]], dict]:
    """({split: {task: its tokens, shard after shard}}, manifest) of a prepared directory (a plain
    prepare's shards count as task 0's)."""
    man = json.loads((out / "manifest.json").read_text())
    got: dict[str, dict[int, list[np.ndarray]]] = {"val": {}, "train": {}}
    for s in man["shards"]:
        got[s["split"]].setdefault(s.get("task", 0), []).append(np.asarray(read_shard(out / s["file"])))
    return {split: {t: np.concatenate(a) for t, a in sorted(by.items())} for split, by in got.items()}, man


def cut_at_eot(a: np.ndarray) -> tuple[tuple, list[tuple]]:
    """(the tokens before the first EOT: the rest of a cut document, documents from each EOT on)."""
    at = np.flatnonzero(a == EOT_ID)
    head = a[: at[0]] if at.size else a
    return tuple(head), [tuple(x) for x in np.split(a, at)[1:]]


def assert_train_like_plain(train: dict[int, np.ndarray], plain_train: np.ndarray) -> None:
    """The relation the module doc guarantees between a split prepare's training tokens and a plain
    prepare's: task 0's stream opens with the same rest of the cut document; after it, the same
    multiset of whole documents, each task's in source order."""
    rest, docs = cut_at_eot(plain_train)
    assert cut_at_eot(train[0])[0] == rest
    assert np.array_equal(np.sort(np.concatenate(list(train.values()))), np.sort(plain_train))  # a multiset
    index = {d: i for i, d in reversed(list(enumerate(docs)))}  # a document's first place in plain order
    mine = [cut_at_eot(a)[1] for a in train.values()]
    assert sorted(d for task in mine for d in task) == sorted(docs)
    for task in mine:  # in source order within a task (its units' documents, read in order)
        order = [index[d] for d in task]
        assert order == sorted(order)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + str(p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("val_tokens", [1500, 3000], ids=["val-in-a-row-group", "val-spans-row-groups"])
def test_tasks_1_3_and_7_cut_validation_as_plain_prepare_does(source, tmp_path, val_tokens):
    """The val shards of a prepare split into 1, 3 or 7 tasks (7 > 5 files: units are parquet row
    groups, and the first file's are spread over tasks 0-3) are exactly the first --val-tokens tokens
    of an independent tokenization, as a plain prepare's are (cut mid-document); the training tokens
    relate to plain prepare's as assert_train_like_plain says (--tasks 1: identical, in order)."""
    src, texts = source
    enc = gpt2_encoding()
    ref = np.concatenate([[EOT_ID, *enc.encode_ordinary(t)] for t in texts]).astype(np.uint16)
    got = {}
    for n in (1, 3, 7):
        tasks_run(src, tmp_path / f"n{n}", n, "--val-tokens", str(val_tokens))
        got[n] = streams(tmp_path / f"n{n}")
    for n, (split, man) in got.items():
        assert list(split["val"]) == [0] and split["val"][0].tobytes() == ref[:val_tokens].tobytes(), n
        assert_train_like_plain(split["train"], ref[val_tokens:])
        assert man["complete"] and man["tasks"] == n and man["totals"]["val_tokens"] == val_tokens
        assert man["totals"]["documents"] == len(texts) and man["totals"]["rows_read"] == 200
    assert got[1][0]["train"][0].tobytes() == ref[val_tokens:].tobytes()
    assert got[7][1]["source"]["unit"] == "parquet row group" and got[3][1]["source"]["unit"] == "file"


def test_plain_and_local_tasks_make_the_same_validation(source, tmp_path, capfd):
    """One validation rule for every prepare mode: `--tasks 2 --local` writes plain prepare's val
    tokens, byte for byte (the cut falls mid-document: the rest of that document opens task 0's
    training split, as it opens plain prepare's), and says so truly; the training tokens relate as
    assert_train_like_plain says."""
    src, _ = source
    assert main([str(src), str(tmp_path / "plain"), *COMMON]) == 0
    assert main([str(src), str(tmp_path / "local"), "--tasks", "2", "--local", *COMMON, "--workers", "2"]) == 0
    (plain, pman), (local, lman) = streams(tmp_path / "plain"), streams(tmp_path / "local")
    assert local["val"][0].tobytes() == plain["val"][0].tobytes() and plain["val"][0].size == 1500
    assert plain["train"][0][0] != EOT_ID  # the cut fell inside a document (else this test shows less)
    assert_train_like_plain(local["train"], plain["train"][0])
    assert lman["totals"]["val_tokens"] == pman["totals"]["val_tokens"] == 1500
    cut = lman["validation"]
    said = f"validation: the first 1,500 tokens ({cut['documents']:,} documents; the last one's other {cut['rest']:,}"
    assert said in capfd.readouterr().out


def test_tasks_refuse_validation_past_the_first_file(source, tmp_path, capsys):
    """Under --tasks the cut must lie in the first file (the module doc says why): a larger
    --val-tokens is refused in one line by the task that reads that file, naming it and the limit."""
    src, _ = source
    assert main([str(src), str(tmp_path / "o"), "--tasks", "3", "--task-id", "0", *COMMON, "--val-tokens",
                 "1000000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "f0.parquet" in err[0] and "fewer than --val-tokens 1,000,000" in err[0], err


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
                            env={**os.environ, **faults.child_env(prepare_sleep=0.3)}, stdout=subprocess.DEVNULL,
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
