"""Trust the inputs: shard content checked against the manifest's sha256 (loader, val loss, resume,
prepare rerun, prepare --verify), token ids the model cannot take refused at the data, bad source
files named in one line, and Ctrl-C in prepare."""

from __future__ import annotations

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
from helpers import REPO, make_synthetic_shards, python_cmd, terminal_sigint, tiny_overrides
from helpers import run as run_cmd

from data_pipeline import integrity
from data_pipeline.loader import DistributedTokenLoader
from data_pipeline.prepare import PrepareConfig, command_line, main, run
from data_pipeline.shards import (
    HEADER_BYTES,
    ShardError,
    file_sha256,
    read_shard,
    write_manifest,
    write_shard,
)
from data_pipeline.sources import SourceError

SETTINGS = {"source": "synthetic:toy", "text_field": "text", "filters": [], "txt_per_line": False,
            "hf_config": None, "hf_split": "train", "data_files": None, "shard_tokens": 12_000,
            "val_tokens": 4_000, "max_tokens": None}


def add_manifest(d: Path, max_ids: bool = True) -> Path:
    """A prepare-style manifest (sha256, tokens, max_token_id) for the shards in ``d``."""
    shards = []
    for p in sorted(d.glob("val_*.bin")) + sorted(d.glob("train_*.bin")):
        tokens = np.asarray(read_shard(p))
        e = {"file": p.name, "split": p.name.split("_")[0], "tokens": int(tokens.size), "documents": 1,
             "sha256": file_sha256(p)}
        if max_ids:
            e["max_token_id"] = int(tokens.max())
        shards.append(e)
    write_manifest(d, {"version": 1, "complete": True, "settings": SETTINGS, "shards": shards})
    return d


def flip(path: Path, offset: int = HEADER_BYTES + 100) -> None:
    """Change one byte of the token area (the header and the size stay valid)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


@pytest.fixture
def data(tmp_path):
    return add_manifest(make_synthetic_shards(tmp_path / "data", n_train_shards=3))


def loader(d, **kw):
    args = dict(seq_len=32, micro_batch_size=2, global_batch_seqs=8, shuffle=False)
    args.update(kw)
    return DistributedTokenLoader(d, "train", **args)


# ---- shard content ----------------------------------------------------------------------------------
def test_loader_refuses_a_corrupt_shard_naming_file_hashes_and_command(data):
    bad = data / "train_000001.bin"
    want = json.loads((data / "manifest.json").read_text())["shards"][2]["sha256"]
    flip(bad)
    ld = loader(data)
    with pytest.raises(ShardError) as e:
        for _ in range(200):  # the stream reaches train_000001 within the first epoch
            ld.next_batch()
    msg = str(e.value)
    assert str(bad) in msg and want in msg and file_sha256(bad) in msg
    assert "gpt2-prepare synthetic:toy" in msg and "--shard-tokens 12000" in msg and "\n" not in msg


def test_corruption_ahead_is_found_in_the_background_before_the_loader_reaches_it(data):
    flip(data / "train_000002.bin")
    ld = loader(data)
    ld.next_batch()  # step 1 needs only train_000000; the thread hashes the rest meanwhile
    deadline = time.time() + 30
    while ld.verification_pending() and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(ShardError, match="train_000002.bin: content does not match"):
        ld.next_batch()  # still in train_000000, but the failure is already known


def test_intact_data_reads_exactly_as_without_verification(data):
    a, b = loader(data), loader(data, verify=False)
    for _ in range(20):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert (xa == xb).all() and (ya == yb).all()
    a.wait_verified()
    assert a.verification_pending() == 0


def test_resume_onto_changed_or_corrupt_data_is_refused(data):
    ld = loader(data)
    for _ in range(3):
        ld.next_batch()
    state = ld.state_dict()
    # (a) the content changed and the manifest with it: refused at load_state_dict, in one line
    p = data / "train_000000.bin"
    tokens = np.asarray(read_shard(p)).copy()
    tokens[5] = (tokens[5] + 1) % 512
    write_shard(p, tokens)
    add_manifest(data)
    with pytest.raises(ValueError, match=r"train_000000.bin had sha256 \w+\.\.\. when the checkpoint was saved"):
        loader(data).load_state_dict(state)
    # (b) bytes changed under an unchanged manifest: refused when the resumed loader opens the shard
    add_manifest(make_synthetic_shards(data, n_train_shards=3))
    state = loader(data).state_dict() | {"consumed_sequences": 24}
    flip(data / "train_000000.bin")
    resumed = loader(data)
    resumed.load_state_dict(state)
    with pytest.raises(ShardError, match="train_000000.bin: content does not match"):
        resumed.next_batch()


def test_val_loss_checks_the_shards_it_reads(data):
    from evals.val_loss import ValLossEvaluator

    ValLossEvaluator(data, 32, 4, 256)
    flip(data / "val_000000.bin")
    with pytest.raises(ShardError, match="val_000000.bin: content does not match"):
        ValLossEvaluator(data, 32, 4, 256)


def test_checkpoint_and_shard_manifests_verify_through_one_helper(tmp_path, monkeypatch, data):
    """pretrain.checkpoint verifies with data_pipeline.integrity.verify_files, as the shards do."""
    import torch

    from pretrain.checkpoint import Checkpointer, load_model_state

    calls = []
    real = integrity.verify_files
    monkeypatch.setattr(integrity, "verify_files", lambda recs, *a: calls.append(len(recs)) or real(recs, *a))
    model = torch.nn.Linear(2, 2)
    path = Checkpointer(tmp_path / "ck", keep_last=1).save(1, model, None, {"step": 1}, None, {})
    load_model_state(path)
    ValLoss = __import__("evals.val_loss", fromlist=["ValLossEvaluator"]).ValLossEvaluator
    ValLoss(data, 32, 4, 256)
    assert len(calls) == 2


# ---- prepare: rerun and --verify --------------------------------------------------------------------
def _jsonl(tmp_path: Path, n: int = 60) -> Path:
    rng = np.random.default_rng(0)
    words = "the of and to in is was for on that with as by at data model school".split()
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 80))}) + "\n" for _ in range(n)))
    return src


def _prep(src, out, **kw):
    args = dict(shard_tokens=1000, val_tokens=1500, workers=1, progress=False, chunk_chars=5000)
    args.update(kw)
    return run(PrepareConfig(source=str(src), out_dir=str(out), **args))


def _bytes(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def test_prepare_rerun_rebuilds_a_corrupt_shard_instead_of_nothing_to_do(tmp_path, capsys):
    out = tmp_path / "o"
    manifest = _prep(_jsonl(tmp_path), out)
    clean = _bytes(out)
    flip(out / "train_000001.bin")
    capsys.readouterr()
    _prep(_jsonl(tmp_path), out)
    said = capsys.readouterr().out
    assert "nothing to do" not in said
    assert "1 shard(s) do not match manifest.json (train_000001.bin: sha256" in said and "rebuilding" in said
    assert _bytes(out) == clean
    assert len(manifest["shards"]) >= 4 and all("max_token_id" in s for s in manifest["shards"])


def test_prepare_verify_reports_each_bad_shard(tmp_path, capsys):
    out = tmp_path / "o"
    _prep(_jsonl(tmp_path), out)
    assert main(["--verify", str(out)]) == 0
    assert "all" in capsys.readouterr().out
    before = _bytes(out)
    flip(out / "val_000000.bin")
    (out / "train_000002.bin").write_bytes((out / "train_000002.bin").read_bytes()[:-2])
    assert main(["--verify", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3
    assert "val_000000.bin: sha256" in err[0] and "train_000002.bin: size" in err[1]
    assert "2 of" in err[2] and f"gpt2-prepare {tmp_path / 'docs.jsonl'} {out}" in err[2]
    assert _bytes(out).keys() == before.keys()  # --verify writes nothing
    assert main(["--verify", str(tmp_path / "nope")]) == 2


def test_command_line_round_trips_the_settings():
    s = PrepareConfig(source="x/*.parquet", out_dir="o", filters=["int_score>=3"], shard_tokens=5,
                      val_tokens=7, txt_per_line=True).settings()
    assert command_line(s, "/d") == ("gpt2-prepare 'x/*.parquet' /d --shard-tokens 5 --val-tokens 7 "
                                     "--filter 'int_score>=3' --txt-per-line")


# ---- token range ------------------------------------------------------------------------------------
def _with_id(d: Path, token: int, pos: int = 777, manifest: bool = True) -> Path:
    make_synthetic_shards(d, n_train_shards=2)
    p = d / "train_000000.bin"
    tokens = np.asarray(read_shard(p)).copy()
    tokens[pos] = token
    write_shard(p, tokens)
    return add_manifest(d) if manifest else d


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest-max", "llmc-no-manifest"])
def test_loader_refuses_ids_beyond_the_vocab_naming_shard_position_id(tmp_path, manifest):
    d = _with_id(tmp_path / "d", 600, manifest=manifest)
    with pytest.raises(ShardError, match=r"train_000000.bin: token id 600 at position 777 is >= the model's "
                                         r"vocab_size 512"):
        ld = loader(d, vocab_size=512)  # with the manifest's max_token_id: refused here
        ld.next_batch()  # without it: when the shard is first opened, before its batch is returned
    assert loader(d, vocab_size=601) is not None


@pytest.mark.parametrize("token,extra", [(600, []), (520, ["model.padded_vocab_size=640"])],
                         ids=["beyond-embedding", "padded-range"])
def test_train_refuses_ids_the_model_cannot_take_before_any_step(tmp_path, token, extra):
    """Was: IndexError from the embedding (600), or every step skipped as non-finite and the advice
    to lower the learning rate (520, inside the padded rows)."""
    d = _with_id(tmp_path / "d", token, pos=3)
    p = run_cmd(python_cmd(tiny_overrides(d, tmp_path / "run", **{"schedule.max_steps": 3, "data.shuffle": "false"}) + extra), check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert f"train_000000.bin: token id {token} at position 3 is >= the model's vocab_size 512" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or '"step"' not in (
        tmp_path / "run" / "metrics.jsonl").read_text()


def test_train_and_resume_on_a_corrupt_shard_exit_2_in_one_line(tmp_path):
    """Was: corrupt bytes trained silently, and a resume into the directory was accepted."""
    d = add_manifest(make_synthetic_shards(tmp_path / "d", n_train_shards=2))
    run_cmd(python_cmd(tiny_overrides(d, tmp_path / "run", **{"schedule.max_steps": 2})))
    flip(d / "train_000001.bin")
    p = run_cmd(python_cmd(tiny_overrides(d, tmp_path / "run", **{"schedule.max_steps": 4})), check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr
    assert "train_000001.bin: content does not match" in lines[0] and "gpt2-prepare" in lines[0]


# ---- bad source files -------------------------------------------------------------------------------
def test_empty_parquet_is_one_line_naming_the_file(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist([{"text": "hello world " * 50}] * 20), src / "a.parquet")
    (src / "b.parquet").write_bytes(b"")
    with pytest.raises(SourceError, match=r"b.parquet: empty \(0 bytes\)"):
        _prep(src, tmp_path / "o", val_tokens=10)
    assert main([str(src / "b.parquet"), str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "b.parquet: empty (0 bytes)" in err[0]


def test_binary_garbage_as_text_is_refused_naming_the_file(tmp_path, capsys):
    junk = tmp_path / "junk.txt"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(SourceError, match="junk.txt: .*binary data, not UTF-8 text"):
        _prep(junk, tmp_path / "o", val_tokens=10)
    (tmp_path / "latin1.txt").write_bytes("naïve café ".encode("latin-1") * 10 + b"plain ascii " * 2000)
    _prep(tmp_path / "latin1.txt", tmp_path / "o2", val_tokens=10)  # a few stray bytes: replaced, as before
    assert main([str(junk), str(tmp_path / "o3"), "--no-progress"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ---- Ctrl-C in prepare ------------------------------------------------------------------------------
def test_prepare_ctrl_c_stops_cleanly_and_prints_the_resume_command(tmp_path):
    src = _jsonl(tmp_path, n=120)
    _prep(src, tmp_path / "clean")
    args = [str(src), str(tmp_path / "o"), "--shard-tokens", "1000", "--val-tokens", "1500", "--workers", "1",
            "--no-progress", "--chunk-chars", "5000"]
    env = {**os.environ, **faults.child_env(prepare_sleep=0.2)}
    # As at a terminal: SIGINT at its default and unblocked in the child, whatever the suite was started
    # with (`make test &` from a script: a non-interactive shell's background job ignores SIGINT, and so
    # do its children); no test leaves it changed (tests/conftest.py).
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.prepare", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=terminal_sigint)
    manifest = tmp_path / "o" / "manifest.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if len(json.loads(manifest.read_text())["shards"]) >= 2:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "interrupted" in line and f"resume with: gpt2-prepare {src} {tmp_path / 'o'}" in line
    assert not json.loads(manifest.read_text())["complete"]
    assert main(args) == 0
    assert _bytes(tmp_path / "o") == _bytes(tmp_path / "clean")


# ---- a half-finished prepare; a manifest rewritten to match a changed shard (issue 19) ---------------
def _incomplete(tmp_path: Path) -> tuple[Path, Path]:
    """A prepare stopped (as by Ctrl-C) after some shards: complete false, a resume record."""
    src = _jsonl(tmp_path, n=120)
    out = tmp_path / "o"
    _prep(src, out, val_tokens=2000)
    man = json.loads((out / "manifest.json").read_text())
    man["complete"] = False
    man.pop("totals")
    (out / "manifest.json").write_text(json.dumps(man))
    return src, out


def test_a_half_finished_prepare_is_refused_by_the_plan_and_val_loss_unless_allowed(tmp_path):
    """Was: trained on (and evaluated) silently, a fraction of the data."""
    from evals.val_loss import ValLossEvaluator

    src, out = _incomplete(tmp_path)
    over = tiny_overrides(out, tmp_path / "run", **{"model.preset": "tiny", "data.seq_len": 16,
                                                   "train.global_batch_tokens": 64, "schedule.max_steps": 2})
    p = run_cmd(python_cmd(over), check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "has not finished ('complete': false" in lines[0]
    assert f"finish it with: gpt2-prepare {src} {out} --shard-tokens 1000 --val-tokens 2000" in lines[0]
    assert "data.allow_incomplete=true" in lines[0]
    with pytest.raises(ShardError, match="has not finished"):
        ValLossEvaluator(out, 16, 2, 64)
    assert ValLossEvaluator(out, 16, 2, 64, allow_incomplete=True).num_sequences == 4
    run_cmd(python_cmd(over + ["data.allow_incomplete=true"]))  # the documented override trains


def test_a_manifest_rewritten_to_match_a_changed_shard_cannot_pass_ids_beyond_the_vocab(tmp_path):
    """The shard's sha256 in the manifest matches its (changed) bytes, and max_token_id still says 511:
    the id 600 is found in the hashing pass and refused in one line (was: a traceback from the model)."""
    d = add_manifest(make_synthetic_shards(tmp_path / "d", n_train_shards=2))
    man = json.loads((d / "manifest.json").read_text())
    p = d / "train_000001.bin"
    tokens = np.asarray(read_shard(p)).copy()
    tokens[5] = 600
    write_shard(p, tokens)
    entry = next(s for s in man["shards"] if s["file"] == p.name)
    entry["sha256"] = file_sha256(p)
    assert entry["max_token_id"] < 512
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ShardError, match="train_000001.bin: token id 600 at position 5"):
        loader(d, vocab_size=512).wait_verified()  # every shard's check, on this thread
    proc = run_cmd(python_cmd(tiny_overrides(d, tmp_path / "run", **{"schedule.max_steps": 8,
                                                                       "data.shuffle": "false"})), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "train_000001.bin: token id 600 at position 5 is >= the model's vocab_size 512" in lines[0]


def test_data_errors_name_the_command_of_the_directory_given(tmp_path):
    """Was: a '../' entry reported as 'holds no training shards'; header/size errors advised both a
    generic command and data.prepare_command of the configured corpus."""
    from pretrain.config import ConfigError, load_config
    from pretrain.plan import make_plan

    src = _jsonl(tmp_path)
    out = tmp_path / "o"
    _prep(src, out)
    with open(out / "train_000001.bin", "r+b") as f:
        f.truncate(1500)
    over = tiny_overrides(out, tmp_path / "run", **{"model.preset": "tiny", "data.seq_len": 16,
                                                   "train.global_batch_tokens": 64})
    with pytest.raises(ConfigError) as e:
        make_plan(load_config(None, over), 1)
    msg = str(e.value)
    assert "train_000001.bin: header says" in msg and f"rebuild it with: gpt2-prepare {src} {out}" in msg
    assert "fineweb" not in msg and "SOURCE OUT_DIR" not in msg
    man = json.loads((out / "manifest.json").read_text())
    man["shards"][-1]["file"] = "../escape.bin"
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ConfigError, match=r"'../escape.bin' points outside its directory"):
        make_plan(load_config(None, over), 1)
    # No data at all: the configured corpus's command, told to write *this* data.dir.
    with pytest.raises(ConfigError, match=r"holds no training shards; create them with: python -m data_pipeline.prepare "
                                          r"fineweb-edu-10B data/fineweb-edu-10B \(with " + str(tmp_path / "nowhere")
                                          + r" as its output directory\)"):
        make_plan(load_config(None, tiny_overrides(tmp_path / "nowhere", tmp_path / "run")), 1)
