"""prepare: shards equal an independent re-tokenization; parallel == serial; killed + rerun == clean run."""

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

from data_pipeline.job import encode_documents
from data_pipeline.loader import DistributedTokenLoader
from data_pipeline.prepare import PrepareConfig, PrepareError, build_parser, run
from data_pipeline.shards import HEADER_BYTES, MAGIC, ShardError, read_header, read_shard
from data_pipeline.sources import SourceError
from data_pipeline.tokenizer import EOT_ID, gpt2_encoding

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be "
         "education school learning students teacher science history language mathematics data model "
         "naïve café Ωmega 数据 😀 — “quoted” $100 3.14 e-mail").split()


def gen_text(rng, n_words):
    words = rng.choice(WORDS, size=n_words)
    return " ".join(words) + rng.choice([".", "!", "?\n\nNext paragraph.", "\n"])


def fineweb_rows(n, seed, edu=True):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        n_words = int(rng.choice([3, 40, 150, 900]))
        r = {"text": gen_text(rng, n_words), "id": f"<urn:uuid:{seed}-{i}>", "dump": "CC-MAIN-2024-10",
             "url": f"https://example.org/{seed}/{i}", "file_path": "s3://commoncrawl/crawl-data/x.warc.gz",
             "language": "en", "language_score": float(rng.uniform(0.65, 1.0)), "token_count": n_words}
        if edu:
            r["score"] = float(rng.uniform(0, 5))
            r["int_score"] = int(round(r["score"]))
        else:
            r["date"] = "2024-02-21T10:00:00Z"
        rows.append(r)
    return rows


def reference_stream(texts):
    """Independent re-tokenization: tiktoken directly, <|endoftext|> before every document."""
    enc = gpt2_encoding()
    out = []
    for t in texts:
        out.append(EOT_ID)
        out.extend(enc.encode_ordinary(t))
    return np.array(out, dtype=np.uint16)


def read_all(out_dir):
    man = json.loads((Path(out_dir) / "manifest.json").read_text())
    val = [np.asarray(read_shard(Path(out_dir) / s["file"])) for s in man["shards"] if s["split"] == "val"]
    train = [np.asarray(read_shard(Path(out_dir) / s["file"])) for s in man["shards"] if s["split"] == "train"]
    return man, np.concatenate(val + train)


def dir_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def prep(source, out, **kw):
    args = dict(shard_tokens=4000, val_tokens=5000, workers=1, progress=False, chunk_chars=20_000)
    args.update(kw)
    return run(PrepareConfig(source=str(source), out_dir=str(out), **args))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    edu = fineweb_rows(120, seed=1)
    pq.write_table(pa.Table.from_pylist(edu[:70]), d / "edu_000.parquet", row_group_size=16)
    pq.write_table(pa.Table.from_pylist(edu[70:]), d / "edu_001.parquet", row_group_size=16)
    web = fineweb_rows(60, seed=2, edu=False)
    (d / "web.jsonl").write_text("".join(json.dumps(r) + "\n" for r in web))
    return d, edu, web


def test_parquet_shards_equal_reference_and_manifest(corpus, tmp_path):
    d, edu, _ = corpus
    man = prep(d / "edu_*.parquet", tmp_path / "out")
    man2, stream = read_all(tmp_path / "out")
    assert man == man2
    ref = reference_stream([r["text"] for r in edu])
    np.testing.assert_array_equal(stream, ref)
    shards = man["shards"]
    assert [s["file"] for s in shards][:2] == ["val_000000.bin", "val_000001.bin"]
    assert [s["tokens"] for s in shards if s["split"] == "val"] == [4000, 1000]
    train = [s for s in shards if s["split"] == "train"]
    assert [s["file"] for s in train] == [f"train_{i:06d}.bin" for i in range(len(train))]
    assert all(s["tokens"] == 4000 for s in train[:-1]) and 0 < train[-1]["tokens"] <= 4000
    for s in shards:
        path = tmp_path / "out" / s["file"]
        raw = path.read_bytes()
        assert np.frombuffer(raw[:12], "<i4").tolist() == [MAGIC, 1, s["tokens"]]
        assert len(raw) == HEADER_BYTES + 2 * s["tokens"]
        assert hashlib.sha256(raw).hexdigest() == s["sha256"]
        assert s["documents"] == int(np.count_nonzero(np.asarray(read_shard(path)) == EOT_ID))
    t = man["totals"]
    assert t["tokens"] == len(ref) and t["val_tokens"] == 5000 and t["documents"] == len(edu) == t["rows_read"]
    assert man["complete"] and man["tokenizer"]["eot_id"] == EOT_ID
    assert man["settings"]["shard_tokens"] == 4000 and man["source"]["kind"] == "files"
    assert not list((tmp_path / "out").glob(".*tmp*"))
    # The trainer's loader reads what prepare wrote.
    ld = DistributedTokenLoader(tmp_path / "out", "val", 64, 4, 4, shuffle=False)
    x, y = ld.next_batch()
    np.testing.assert_array_equal(x[0].numpy(), ref[:64])


def test_jsonl_fineweb_schema_and_filter(corpus, tmp_path):
    d, _, web = corpus
    prep(d / "web.jsonl", tmp_path / "web", val_tokens=3000)
    np.testing.assert_array_equal(read_all(tmp_path / "web")[1], reference_stream([r["text"] for r in web]))
    d2, edu, _ = corpus
    man = prep(d2 / "edu_*.parquet", tmp_path / "f", filters=["int_score>=3"], val_tokens=2000)
    kept = [r["text"] for r in edu if r["int_score"] >= 3]
    assert 0 < len(kept) < len(edu)
    np.testing.assert_array_equal(read_all(tmp_path / "f")[1], reference_stream(kept))
    assert man["totals"]["filtered"] == len(edu) - len(kept)


def test_text_policy(tmp_path):
    lines = [
        json.dumps({"text": "plain"}),
        json.dumps({"text": ""}),  # empty: skipped
        json.dumps({"text": "  \n\t "}),  # whitespace only: skipped
        json.dumps({"text": None}),  # null: skipped as empty
        json.dumps({"text": "before <|endoftext|> after"}),  # literal: ordinary text
        json.dumps({"text": "lone \ud800 surrogate, pair \ud83d\ude00"}),  # JSON escapes
    ]
    raw = ("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff\xfe bytes"}\n' + b"\n"
    (tmp_path / "x.jsonl").write_bytes(raw)
    man = prep(tmp_path / "x.jsonl", tmp_path / "o", val_tokens=5, shard_tokens=8)
    expected = ["plain", "before <|endoftext|> after", "lone \ufffd surrogate, pair \U0001F600",
                "bad \ufffd\ufffd bytes"]
    stream = read_all(tmp_path / "o")[1]
    np.testing.assert_array_equal(stream, reference_stream(expected))
    assert np.count_nonzero(stream == EOT_ID) == 4  # the literal never became the control token
    assert man["totals"]["skipped_empty"] == 3 and man["totals"]["documents"] == 4


def test_encode_documents_matches_encode_ordinary():
    texts = ["a <|endoftext|> b", "x" * 5000, "數據 😀", "\ud800"]
    flat, lens = encode_documents(texts)
    assert flat.dtype == np.uint16 and lens.tolist() == [len(t) for t in np.split(flat, np.cumsum(lens)[:-1])]
    np.testing.assert_array_equal(flat, reference_stream(texts[:3] + ["\ufffd"]))


@pytest.mark.parametrize("kw", [dict(workers=2), dict(workers=2, backend="processes"),
                                dict(workers=2, chunk_chars=1)])
def test_parallel_is_byte_identical(corpus, tmp_path, kw):
    d, _, _ = corpus
    prep(d, tmp_path / "one")
    prep(d, tmp_path / "two", **kw)
    assert dir_bytes(tmp_path / "one") == dir_bytes(tmp_path / "two")


def test_max_tokens_is_a_prefix(corpus, tmp_path):
    d, edu, _ = corpus
    man = prep(d / "edu_*.parquet", tmp_path / "cap", max_tokens=12_345)
    stream = read_all(tmp_path / "cap")[1]
    assert len(stream) == man["totals"]["tokens"] == 12_345
    np.testing.assert_array_equal(stream, reference_stream([r["text"] for r in edu])[:12_345])


@pytest.mark.parametrize("max_tokens", [None, 13_000])
def test_resume_from_every_shard_boundary(corpus, tmp_path, max_tokens):
    """Simulate a kill after each committed shard (manifest rolled back); the rerun must match."""
    d, _, _ = corpus
    prep(d, tmp_path / "clean", max_tokens=max_tokens)
    clean = dir_bytes(tmp_path / "clean")
    man = json.loads(clean["manifest.json"])
    n = len(man["shards"])
    assert n >= 4
    for k in range(1, n):
        out = tmp_path / f"k{k}"
        out.mkdir()
        partial = dict(man, complete=False, shards=man["shards"][:k])
        partial.pop("totals")
        (out / "manifest.json").write_text(json.dumps(partial))
        for s in man["shards"][:k]:
            (out / s["file"]).write_bytes(clean[s["file"]])
        if k + 1 < n:  # a stray, already-renamed next shard that the manifest never recorded
            (out / man["shards"][k]["file"]).write_bytes(b"garbage")
        (out / ".train_000009.bin.tmp-1-abc").write_bytes(b"half")  # a dead run's temp file
        prep(d, out, max_tokens=max_tokens, workers=2)
        assert dir_bytes(out) == clean, f"resume after shard {k}"


def test_sigkill_mid_run_then_rerun_is_identical(corpus, tmp_path):
    d, _, _ = corpus
    prep(d, tmp_path / "clean")
    cmd = [sys.executable, "-m", "data_pipeline.prepare", str(d), str(tmp_path / "killed"),
           "--shard-tokens", "4000", "--val-tokens", "5000", "--workers", "2", "--no-progress",
           "--chunk-chars", "20000"]
    env = {**os.environ, **faults.child_env(prepare_sleep=0.25)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 90
    try:
        while time.time() < deadline:
            try:
                if len(json.loads(manifest.read_text())["shards"]) >= 3:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        else:
            pytest.fail("prepare never wrote 3 shards")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not json.loads(manifest.read_text())["complete"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    assert dir_bytes(tmp_path / "killed") == dir_bytes(tmp_path / "clean")


def test_rerun_finished_and_changed_args(corpus, tmp_path, capsys):
    d, _, _ = corpus
    prep(d / "web.jsonl", tmp_path / "o", val_tokens=3000)
    before = dir_bytes(tmp_path / "o")
    capsys.readouterr()
    prep(d / "web.jsonl", tmp_path / "o", val_tokens=3000, workers=2)  # workers do not change the output
    assert "nothing to do" in capsys.readouterr().out
    assert dir_bytes(tmp_path / "o") == before
    with pytest.raises(PrepareError, match=r"different arguments \(shard_tokens: 4000 -> 5000\)"):
        prep(d / "web.jsonl", tmp_path / "o", val_tokens=3000, shard_tokens=5000)
    assert dir_bytes(tmp_path / "o") == before
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "train_000000.bin").write_bytes(b"x")
    with pytest.raises(PrepareError, match="no manifest.json; refusing to overwrite"):
        prep(d / "web.jsonl", tmp_path / "stray")


def test_clear_errors(corpus, tmp_path):
    d, _, _ = corpus
    with pytest.raises(SourceError, match="no column 'body'.*--text-field"):
        prep(d / "edu_000.parquet", tmp_path / "a", text_field="body")
    (tmp_path / "e.jsonl").write_text('{"text": "  "}\n{"text": ""}\n')
    with pytest.raises(SourceError, match="no documents"):
        prep(tmp_path / "e.jsonl", tmp_path / "b")
    (tmp_path / "m.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(SourceError, match="row 0 has no field 'text'"):
        prep(tmp_path / "m.jsonl", tmp_path / "c")
    with pytest.raises(PrepareError, match="lower --val-tokens"):
        prep(d / "web.jsonl", tmp_path / "d", val_tokens=10**9)


def test_cli_help_lists_options_with_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for opt in ["--shard-tokens", "--val-tokens", "--max-tokens", "--workers", "--text-field", "--filter",
                "--backend", "--txt-per-line", "--hf-config", "--data-files"]:
        assert opt in out
    assert "100000000" in out and "default: text" in out


def test_cli_end_to_end_and_fsspec_output(corpus, tmp_path, capsys):
    import fsspec

    from data_pipeline.prepare import main

    d, _, web = corpus
    assert main([str(d / "web.jsonl"), "memory://prep/out", "--shard-tokens", "4000", "--val-tokens", "3000",
                 "--workers", "2", "--no-progress"]) == 0
    assert "in-memory filesystem: the shards end with this process" in capsys.readouterr().err  # said, not silent
    mem = fsspec.filesystem("memory")
    man = json.loads(mem.cat("/prep/out/manifest.json"))
    stream = []
    for s in man["shards"]:
        raw = mem.cat(f"/prep/out/{s['file']}")
        assert hashlib.sha256(raw).hexdigest() == s["sha256"]
        stream.append(np.frombuffer(raw[HEADER_BYTES:], dtype="<u2"))
    np.testing.assert_array_equal(np.concatenate(stream), reference_stream([r["text"] for r in web]))
    assert not [p for p in mem.find("/prep/out") if "tmp" in p]
    assert main([str(d / "web.jsonl"), str(tmp_path / "x"), "--shard-tokens", "0"]) == 2


def test_uint16_guard_in_shard_writer(tmp_path):
    from data_pipeline.shards import write_shard

    with pytest.raises(ShardError, match="fit uint16"):
        write_shard(tmp_path / "x.bin", np.array([EOT_ID, 65536], dtype=np.int64))
    assert read_header is not None


def test_out_dir_protocol_allowlist(tmp_path, capsys):
    from data_pipeline.prepare import main

    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    assert main([str(tmp_path / "d.jsonl"), "ftp://127.0.0.1:9/out", "--no-progress"]) == 2
    assert "protocol 'ftp' is not allowed" in capsys.readouterr().err


def test_disk_full_is_one_line_and_resumable(corpus, tmp_path, monkeypatch, capsys):
    import errno

    from data_pipeline.prepare import main

    d, _, web = corpus
    args = [str(d / "web.jsonl"), str(tmp_path / "o"), "--shard-tokens", "4000", "--val-tokens", "3000",
            "--workers", "1", "--no-progress"]
    real = os.fsync

    def full_disk(fd):
        if "train_000001.bin" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left" in err[0] and "train_000001.bin" in err[0] and "rerun" in err[0]
    assert not (tmp_path / "o" / "train_000001.bin").exists() and not list((tmp_path / "o").glob(".*tmp*"))
    monkeypatch.undo()
    assert main(args) == 0
    np.testing.assert_array_equal(read_all(tmp_path / "o")[1], reference_stream([r["text"] for r in web]))


def test_datasets_streaming_source_through_prepare_and_resume(corpus, tmp_path):
    """`datasets:parquet` (load_dataset(..., streaming=True)) gives the same shards as the file
    reader, and resumes (IterableDataset.skip) to the same bytes."""
    d, _, _ = corpus
    files = [str(d / "edu_000.parquet"), str(d / "edu_001.parquet")]
    prep(d / "edu_*.parquet", tmp_path / "files")
    prep("datasets:parquet", tmp_path / "hf", data_files=files)
    a, b = dir_bytes(tmp_path / "files"), dir_bytes(tmp_path / "hf")
    assert {k: v for k, v in a.items() if k != "manifest.json"} == {k: v for k, v in b.items() if k != "manifest.json"}
    man = json.loads(b["manifest.json"])
    partial = dict(man, complete=False, shards=man["shards"][:3])
    partial.pop("totals")
    (tmp_path / "hf2").mkdir()
    (tmp_path / "hf2" / "manifest.json").write_text(json.dumps(partial))
    for s in man["shards"][:3]:
        (tmp_path / "hf2" / s["file"]).write_bytes(b[s["file"]])
    prep("datasets:parquet", tmp_path / "hf2", data_files=files, workers=2)
    assert dir_bytes(tmp_path / "hf2") == b


def test_resume_refuses_a_changed_source(tmp_path):
    rows = [{"text": f"document number {i} " * 30} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    man = prep(tmp_path / "d.jsonl", tmp_path / "o", val_tokens=500, shard_tokens=1000)
    partial = dict(man, complete=False, shards=man["shards"][:2])
    partial.pop("totals")
    (tmp_path / "o" / "manifest.json").write_text(json.dumps(partial))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": "x"}) + "\n" for _ in range(40)))
    with pytest.raises(PrepareError, match="source changed"):
        prep(tmp_path / "d.jsonl", tmp_path / "o", val_tokens=500, shard_tokens=1000)


# ---- refusals before the first write (issue 19) -------------------------------------------------
@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_an_unusable_out_dir_is_exit_2_in_one_line_before_any_write(tmp_path, capsys, monkeypatch, where):
    """Was: exit 1 with 'fix that (e.g. free space)' after the work had started."""
    from data_pipeline.prepare import main

    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "hello world " * 50}) + "\n")
    (tmp_path / "f").write_text("x")
    out = {"a file": tmp_path / "f", "under a file": tmp_path / "f" / "out", "read-only": tmp_path / "ro" / "out"}[where]
    if where == "read-only":
        (tmp_path / "ro").mkdir()
        real = os.access  # root writes through chmod: the check is os.access, so say it as EROFS would
        monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p) == str(tmp_path / "ro") else real(p, m, **k))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main([str(src), str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpt2-prepare: error: ") and "OUT_DIR" in err[0], err
    assert {"a file": "is not a directory", "under a file": "is a file", "read-only": "not writable"}[where] in err[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (chmod) directory")
def test_a_read_only_out_dir_is_exit_2_without_patching(tmp_path, capsys):
    from data_pipeline.prepare import main

    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "hello world " * 50}) + "\n")
    (tmp_path / "ro").mkdir(mode=0o555)
    assert main([str(src), str(tmp_path / "ro" / "out"), "--no-progress"]) == 2
    assert "not writable" in capsys.readouterr().err


def test_a_permission_error_while_writing_is_an_input_fault(tmp_path, capsys, monkeypatch):
    from data_pipeline import prepare

    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": "hello world " * 50}) + "\n")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "o" / "val_000000.bin"))

    from data_pipeline import job  # the shard writer

    monkeypatch.setattr(job, "write_shard", denied)
    assert prepare.main([str(src), str(tmp_path / "o"), "--no-progress", "--val-tokens", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Permission denied (errno 13)" in err[0] and "free space" not in err[0]


def test_a_prepare_refused_at_a_bad_row_leaves_nothing_that_blocks_the_corrected_rerun(tmp_path, capsys):
    """Was: the manifest (with the wrong --text-field) was written before the first row was read, and
    the corrected command was refused as 'prepared with different arguments'."""
    from data_pipeline.prepare import main

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"body": f"document {i} " * 40}) + "\n" for i in range(30)))
    out = tmp_path / "o"
    assert main([str(src), str(out), "--no-progress", "--val-tokens", "100", "--shard-tokens", "200"]) == 2
    assert "has no field 'text'" in capsys.readouterr().err
    assert not out.exists()
    assert main([str(src), str(out), "--no-progress", "--val-tokens", "100", "--shard-tokens", "200",
                 "--text-field", "body"]) == 0
    # A claim left by an older version (a manifest, no shard) does not block either.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"complete": False, "settings": {"text_field": "x"},
                                                                "shards": []}))
    assert main([str(src), str(tmp_path / "old"), "--no-progress", "--val-tokens", "100", "--text-field", "body"]) == 0


def test_an_interrupted_final_commit_resumes_to_the_same_bytes(corpus, tmp_path):
    """A stop between the last shard and the 'complete' manifest: the rerun finishes without re-reading."""
    d, _, _ = corpus
    prep(d / "edu_*.parquet", tmp_path / "clean")
    out = tmp_path / "o"
    prep(d / "edu_*.parquet", out)
    man = json.loads((out / "manifest.json").read_text())
    assert man["shards"][-1]["final"] and man["shards"][-1]["resume"]["row"] == man["totals"]["rows_read"]
    man["complete"] = False
    man.pop("totals")
    (out / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")
    prep(d / "edu_*.parquet", out)
    assert dir_bytes(out) == dir_bytes(tmp_path / "clean")
