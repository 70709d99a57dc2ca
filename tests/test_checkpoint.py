"""Checkpointer: exact round trips, atomic commit, retention, corruption / tampering refusal, ENOSPC,
async saves, and 2-rank gloo DDP + FSDP2 (one real torchrun run shared by the distributed tests)."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain.checkpoint.layout as ckpt_layout
from pretrain.checkpoint import (
    Checkpointer,
    CheckpointError,
    capture_rng_state,
    load_model_state,
    restore_rng_state,
)
from pretrain.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"model": {"preset": "tiny"}, "train": {"lr": 1e-3, "run_dir": Path("/tmp/run")}}


def make(seed: int = 0, train_steps: int = 1):
    """A tiny GPT + AdamW with non-trivial optimizer state."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset("tiny-vocab"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for i in range(train_steps):
        g = torch.Generator().manual_seed(seed * 100 + i)
        x = torch.randint(0, 500, (2, 16), generator=g)
        model(x, x)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def assert_tree_equal(a, b, where="root"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_tree_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def save(ck: Checkpointer, step: int, model, opt, **kw):
    return ck.save(step, model, opt, {"step": step, "tokens": step * 1024, "loader": {"pos": step}},
                   capture_rng_state(), CONFIG, **kw)


def rewrite_manifest(path: Path, name: str, target: Path | None = None) -> None:
    """Re-hash one file into the manifest, as a tamperer would (so only the content check is left)."""
    manifest = json.loads((path / "manifest.json").read_text())
    digest, size = ckpt_layout._sha256(target or path / name)
    manifest["files"][name] = {"sha256": digest, "size": size}
    (path / "manifest.json").write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- single process


def test_round_trip_restores_model_optimizer_rng_and_state(tmp_path):
    model, opt = make(seed=1, train_steps=2)
    ck = Checkpointer(tmp_path, keep_last=3)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    path = save(ck, 10, model, opt)
    expect = (torch.rand(4), random.random(), np.random.rand(3))

    scramble = (torch.manual_seed(123), random.seed(1), np.random.seed(2))  # noqa: F841
    model2, opt2 = make(seed=2, train_steps=1)
    trainer_state, rank_state = ck.load(ck.latest(), model2, opt2)
    restore_rng_state(rank_state)
    assert torch.equal(torch.rand(4), expect[0])
    assert random.random() == expect[1]
    assert np.array_equal(np.random.rand(3), expect[2])

    assert path == tmp_path / "step_00000010" and ck.latest() == path
    assert trainer_state == {"step": 10, "tokens": 10 * 1024, "loader": {"pos": 10}}
    assert_tree_equal(model.state_dict(), model2.state_dict())
    assert_tree_equal(opt.state_dict(), opt2.state_dict())
    assert model2.lm_head.weight is model2.transformer.wte.weight  # the tie survives
    # The next optimizer step is identical too (bitwise resume).
    for m, o in ((model, opt), (model2, opt2)):
        x = torch.arange(32).view(2, 16)
        m(x, x)[1].backward()
        o.step()
    assert_tree_equal(model.state_dict(), model2.state_dict())
    assert (path / "config.yaml").is_file() and json.loads((path / "config.json").read_text())["model"] == {
        "preset": "tiny"}
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(files) == sorted(p.name for p in path.iterdir() if p.name not in ("manifest.json", "COMMITTED"))


def test_prefixes_are_stripped_and_plain_data_enforced(tmp_path):
    class Wrapper(torch.nn.Module):  # what DDP / torch.compile would add to the names
        def __init__(self, m):
            super().__init__()
            self.module = m

    model, opt = make()
    ck = Checkpointer(tmp_path, keep_last=1)
    path = ck.save(1, Wrapper(model), opt, {"step": 1}, None, CONFIG)
    sd, cfg = load_model_state(path)
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in sd)
    assert_tree_equal(sd, model.state_dict())
    assert cfg["train"]["run_dir"] == "/tmp/run"
    class Compiled(torch.nn.Module):  # what torch.compile's OptimizedModule looks like (compiling costs seconds)
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    compiled = Compiled(make(seed=3)[0])
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    ck.load(path, compiled, None)
    assert_tree_equal(compiled._orig_mod.state_dict(), model.state_dict())
    with pytest.raises(CheckpointError, match=r"rank_state\['np'\] is a numpy.ndarray.*torch.from_numpy"):
        ck.save(2, model, opt, {"step": 2}, {"np": np.zeros(3)}, CONFIG)
    assert ck.latest() == path and not list(tmp_path.glob("*.tmp"))


def test_keep_last(tmp_path):
    model, opt = make()
    ck = Checkpointer(tmp_path, keep_last=2)
    for step in range(1, 6):
        save(ck, step, model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000005"]
    assert ck.latest() == tmp_path / "step_00000005"


def test_latest_ignores_tmp_and_incomplete_dirs(tmp_path):
    model, opt = make()
    ck = Checkpointer(tmp_path, keep_last=5)
    good = save(ck, 3, model, opt)
    for name, drop in (("step_00000009.tmp", None), ("step_00000008", "COMMITTED"), ("step_00000007", "manifest.json")):
        shutil.copytree(good, tmp_path / name)
        if drop:
            (tmp_path / name / drop).unlink()
    (tmp_path / "step_00000006").mkdir()
    (tmp_path / "step_00000005").mkdir()
    (tmp_path / "step_00000005" / "COMMITTED").write_text("5")
    (tmp_path / "step_00000005" / "manifest.json").write_text("{not json")
    assert ck.latest() == good
    with pytest.raises(CheckpointError, match="no COMMITTED marker"):
        ck.load(tmp_path / "step_00000008", *make())
    # The next save removes the stale tmp dir and the never-loadable ones.
    save(ck, 4, model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]
    assert ck.latest() == tmp_path / "step_00000004"


def test_exception_mid_save_keeps_previous(tmp_path, monkeypatch):
    model, opt = make()
    ck = Checkpointer(tmp_path, keep_last=3)
    good = save(ck, 1, model, opt)
    real_save, calls = torch.save, []

    def flaky(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky)
    with pytest.raises(CheckpointError, match=r"step 2 .*simulated crash.*previous checkpoint step 1"):
        save(ck, 2, model, opt)
    assert len(calls) == 3
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    assert ck.latest() == good
    ck.load(good, *make(seed=3))


def test_sigkill_mid_save_keeps_previous(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(REPO)!r})
        torch.set_num_threads(1)
        from pretrain.checkpoint import Checkpointer
        from pretrain.model import GPT, GPTConfig
        m = GPT(GPTConfig.from_preset("tiny-vocab")); o = torch.optim.AdamW(m.parameters())
        ck = Checkpointer({str(tmp_path)!r}, keep_last=3)
        ck.save(1, m, o, {{"step": 1}}, None, {{}})
        real = torch.save
        def slow(obj, f, *a, **k):
            real(obj, f, *a, **k)
            print("WROTE", flush=True)
            time.sleep(60)
        torch.save = slow
        ck.save(2, m, o, {{"step": 2}}, None, {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WROTE", line
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert (tmp_path / "step_00000002.tmp").is_dir()  # killed mid-save
    ck = Checkpointer(tmp_path, keep_last=3)
    assert ck.latest() == tmp_path / "step_00000001"
    model, opt = make()
    ck.load(ck.latest(), model, opt)
    save(ck, 3, model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000003"]


@pytest.mark.parametrize("name", ["model.pt", "optim.pt", "rank_0.pt", "trainer_state.pt"])
def test_bit_flip_refused(tmp_path, name):
    model, opt = make()
    ck = Checkpointer(tmp_path, keep_last=1)
    path = save(ck, 1, model, opt)
    data = bytearray((path / name).read_bytes())
    data[len(data) // 2] ^= 0x10
    (path / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{name} failed its sha256 check; the checkpoint is corrupt.*--resume PATH"):
        ck.load(path, *make(seed=4))


def test_pickled_callable_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    model, opt = make()
    ck = Checkpointer(tmp_path / "ck", keep_last=1)
    path = save(ck, 1, model, opt)
    torch.save({"step": Evil()}, path / "trainer_state.pt")
    rewrite_manifest(path, "trainer_state.pt")
    with pytest.raises(CheckpointError, match="trainer_state.pt holds objects other than tensors"):
        ck.load(path, *make())
    assert not marker.exists()


def test_manifest_path_traversal_refused(tmp_path):
    model, opt = make()
    ck = Checkpointer(tmp_path / "ck", keep_last=1)
    path = save(ck, 1, model, opt)
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    for name in ("../../secret.txt", str(outside)):
        bad = json.loads((path / "manifest.json").read_text())
        good_text = (path / "manifest.json").read_text()
        digest, size = ckpt_layout._sha256(outside)
        bad["files"][name] = {"sha256": digest, "size": size}
        (path / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="refused"):
            ck.load(path, *make())
        with pytest.raises(CheckpointError, match="refused"):
            load_model_state(path)
        (path / "manifest.json").write_text(good_text)
    ck.load(path, *make())


def test_resave_same_step_does_not_mix_files(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    model_a, opt_a = make(seed=1)
    save(ck, 5, model_a, opt_a)
    model_b, _ = make(seed=2)
    path = ck.save(5, model_b, None, {"step": 5, "run": "b"}, None, CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005"]
    names = sorted(p.name for p in path.iterdir())
    assert "optim.pt" not in names and "rank_0.pt" not in names  # nothing left from the first save
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(files) == sorted(n for n in names if n not in ("manifest.json", "COMMITTED"))
    model_c, _ = make(seed=3)
    trainer_state, rank_state = ck.load(path, model_c, None)
    assert trainer_state["run"] == "b" and rank_state is None
    assert_tree_equal(model_c.state_dict(), model_b.state_dict())


def test_crash_between_renames_of_a_resave_keeps_the_old_one(tmp_path):
    model, opt = make()
    ck = Checkpointer(tmp_path, keep_last=2)
    path = save(ck, 5, model, opt)
    os.rename(path, tmp_path / "step_00000005.replaced")  # old one moved aside, new one not yet in
    assert ck.latest() == tmp_path / "step_00000005.replaced"
    ck.load(ck.latest(), *make(seed=2))
    save(ck, 5, model, opt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005"]


def test_failing_delete_keeps_newest_and_does_not_raise(tmp_path, monkeypatch, caplog):
    model, opt = make()
    ck = Checkpointer(tmp_path, keep_last=1)
    save(ck, 1, model, opt)

    def refuse(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(shutil, "rmtree", refuse)
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        save(ck, 2, model, opt)
        save(ck, 3, model, opt)
    assert "could not delete old checkpoint" in caplog.text
    assert ck.latest() == tmp_path / "step_00000003"
    ck.load(ck.latest(), *make(seed=5))
    monkeypatch.undo()
    save(ck, 4, model, opt)  # deletes work again: the half-deleted ones go too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]


def test_enospc_clear_error_and_previous_intact(tmp_path, monkeypatch):
    model, opt = make()
    ck = Checkpointer(tmp_path, keep_last=3)
    good = save(ck, 1, model, opt)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"x" * 4096)  # some bytes land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as info:
        save(ck, 2, model, opt)
    msg = str(info.value)
    assert msg.startswith(f"no space left on device while writing checkpoint step 2 to {tmp_path}; free space "
                          "there or point train.run_dir (its checkpoints/ folder) at another filesystem; "
                          "the previous checkpoint step 1")  # train.run_dir: a real key (checkpoint.dir is not)
    assert "intact" in msg
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    assert ck.latest() == good
    ck.load(good, *make(seed=2))


# ----------------------------------------------------------------------------- async


def test_async_equals_sync_and_snapshots_before_mutation(tmp_path):
    model, opt = make(seed=1, train_steps=2)
    sync_path = save(Checkpointer(tmp_path / "sync", keep_last=1), 7, model, opt)
    expect_model = {k: v.clone() for k, v in model.state_dict().items()}
    ck = Checkpointer(tmp_path / "async", keep_last=1, async_save=True)
    async_path = save(ck, 7, model, opt)
    with torch.no_grad():  # training goes on at once
        for p in model.parameters():
            p.add_(1.0)
    for state in opt.state.values():
        state["exp_avg"].mul_(0)
    ck.wait()
    assert ck.latest() == async_path
    for name in ("model.pt", "optim.pt", "trainer_state.pt"):
        a = torch.load(sync_path / name, weights_only=True)
        b = torch.load(async_path / name, weights_only=True)
        assert_tree_equal(a, b, name)
    assert_tree_equal(torch.load(async_path / "model.pt", weights_only=True), expect_model)


def test_async_one_save_in_flight_and_errors_reraised(tmp_path, monkeypatch):
    model, opt = make()
    ck = Checkpointer(tmp_path, keep_last=5, async_save=True)
    real_save = torch.save
    active, seen = [0], []
    lock = threading.Lock()

    def slow(obj, f, *a, **k):
        step = int(Path(f.name).parent.name[5:13])
        with lock:
            active[0] += 1
            seen.append((step, active[0], sorted(s for s, _ in ckpt_layout._complete_checkpoints(tmp_path))))
        time.sleep(0.02)
        try:
            return real_save(obj, f, *a, **k)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(torch, "save", slow)
    for step in (1, 2, 3):
        save(ck, step, model, opt)
    ck.wait()
    assert max(n for _, n, _ in seen) == 1
    for step, _, committed in seen:  # each save starts only after the previous one committed
        assert committed == list(range(1, step))
    assert ck.latest() == tmp_path / "step_00000003"

    def full_disk(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    save(ck, 4, model, opt)  # returns at once; the failure surfaces on the next call
    with pytest.raises(CheckpointError, match="no space left on device while writing checkpoint step 4"):
        ck.wait()
    ck.wait()  # reported once
    monkeypatch.setattr(torch, "save", real_save)
    assert not list(tmp_path.glob("*.tmp")) and ck.latest() == tmp_path / "step_00000003"
    save(ck, 5, model, opt)
    ck.wait()
    assert ck.latest() == tmp_path / "step_00000005"


# ----------------------------------------------------------------------------- 2 ranks, gloo (torchrun)

WORKER = r'''
import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, os.environ["REPO"])
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from pretrain.checkpoint import Checkpointer, capture_rng_state, restore_rng_state
from pretrain.model import GPT, GPTConfig

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, ws = dist.get_rank(), dist.get_world_size()
out = sys.argv[1]
res = {}

def build(seed, fsdp):
    torch.manual_seed(seed)
    m = GPT(GPTConfig.from_preset("tiny-vocab"))
    if fsdp:
        for block in m.transformer.h:
            fully_shard(block)
        fully_shard(m)
        return m, m
    return m, DDP(m)

def train(wrapped, opt, steps=1):
    for i in range(steps):
        g = torch.Generator().manual_seed(10 * rank + i)
        x = torch.randint(0, 500, (2, 16), generator=g)
        wrapped(x, x)[1].backward()
        opt.step()
        opt.zero_grad()

def clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone(v) for v in x)
    return x

def full(m, o):  # full (unsharded) copies, on every rank
    return clone(get_state_dict(m, o, options=StateDictOptions(full_state_dict=True)))

def equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b

for mode in ("ddp", "fsdp"):
    fsdp = mode == "fsdp"
    for async_save in (False, True):
        name = f"{mode}_{'async' if async_save else 'sync'}"
        model, wrapped = build(0, fsdp)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        train(wrapped, opt, 2)
        ck = Checkpointer(os.path.join(out, name), keep_last=2, rank=rank, world_size=ws, async_save=async_save)
        torch.manual_seed(1000 + rank)
        path = ck.save(3, model, opt, {"step": 3}, capture_rng_state(), {"mode": mode}, fsdp=fsdp)
        expect_rand = torch.rand(3)
        before = full(model, opt)
        if async_save:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            ck.wait()
        if rank == 0 and fsdp and not async_save:
            torch.save(before[0], os.path.join(out, "fsdp_full_model.pt"))
            torch.save(before[1], os.path.join(out, "fsdp_full_optim.pt"))
        if rank == 0 and not fsdp and not async_save:
            torch.save(before[0], os.path.join(out, "ddp_full_model.pt"))
        model2, wrapped2 = build(1, fsdp)
        opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
        trainer_state, rank_state = ck.load(ck.latest(), model2, opt2, fsdp=fsdp)
        torch.manual_seed(5)
        restore_rng_state(rank_state)
        after = full(model2, opt2)
        res[name] = {
            "latest": str(ck.latest()), "path": str(path), "trainer_state": trainer_state,
            "model_equal": equal(before[0], after[0]), "optim_equal": equal(before[1], after[1]),
            "rng_equal": torch.equal(torch.rand(3), expect_rand),
        }
        # One more step from each gives the same parameters: a bitwise resume.
        if not async_save:
            train(wrapped, opt)
            train(wrapped2, opt2)
            res[name]["next_step_equal"] = equal(full(model, opt)[0], full(model2, opt2)[0])
        if not async_save:  # rank 1 hits a full disk on the next save: every rank fails cleanly, no hang
            real_save = torch.save

            def full_disk(obj, f, *a, **k):
                raise OSError(28, "No space left on device")

            if rank == 1:
                torch.save = full_disk
            try:
                ck.save(4, model, opt, {"step": 4}, capture_rng_state(), {"mode": mode}, fsdp=fsdp)
                res[name]["failed_save"] = "no error"
            except Exception as e:
                res[name]["failed_save"] = f"{type(e).__name__}: {e}"
            torch.save = real_save
            dist.barrier()
            res[name]["after_failed_save"] = sorted(os.listdir(os.path.join(out, name)))
        dist.barrier()

with open(os.path.join(out, f"result_{rank}.json"), "w") as f:
    json.dump(res, f)
dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    script = out / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, REPO=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [json.loads((out / f"result_{r}.json").read_text()) for r in range(2)]
    return out, results


@pytest.mark.parametrize("name", ["ddp_sync", "ddp_async", "fsdp_sync", "fsdp_async"])
def test_two_rank_save_load_restores_exactly(two_rank_run, name):
    out, results = two_rank_run
    for rank, res in enumerate(results):
        r = res[name]
        assert r["model_equal"] and r["optim_equal"], (rank, r)
        assert r["rng_equal"], (rank, r)  # each rank got its own RNG state back
        assert r["trainer_state"] == {"step": 3}
        assert r["latest"] == r["path"] == str(out / name / "step_00000003")
        if "next_step_equal" in r:
            assert r["next_step_equal"], (rank, r)
    if name.endswith("_sync"):  # rank 1 ran out of space saving step 4: both ranks raised, step 3 intact
        assert results[1][name]["failed_save"].startswith(
            "CheckpointError: no space left on device while writing checkpoint step 4"), results[1][name]
        # DDP: rank 0 wrote fine and hears of rank 1's failure; FSDP: DCP's collective save already
        # reports rank 1's ENOSPC to every rank.
        assert results[0][name]["failed_save"].startswith(
            "CheckpointError: checkpoint step 4 was not saved" if name == "ddp_sync" else
            "CheckpointError: no space left on device while writing checkpoint step 4"), results[0][name]
        for r in results:
            assert "previous checkpoint step 3" in r[name]["failed_save"]
            assert r[name]["after_failed_save"] == ["step_00000003"]
    path = out / name / "step_00000003"
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert {"rank_0.pt", "rank_1.pt", "trainer_state.pt", "config.json"} <= set(files)
    if name.startswith("fsdp"):
        assert ".metadata" in {Path(n).name for n in files} and sum(n.endswith(".distcp") for n in files) == 2
    else:
        assert {"model.pt", "optim.pt"} <= set(files)
    assert not list((out / name).glob("*.tmp"))


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_load_model_state_single_process(two_rank_run, mode):
    out, _ = two_rank_run
    assert not torch.distributed.is_initialized()
    state, config = load_model_state(out / f"{mode}_sync" / "step_00000003")
    expect = torch.load(out / f"{mode}_full_model.pt", weights_only=True)
    assert config == {"mode": mode}
    assert_tree_equal(state, expect)
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()  # tied, stored once
    model = GPT(GPTConfig.from_preset("tiny-vocab"))
    model.load_state_dict(state)


def test_fsdp_shard_bit_flip_refused(two_rank_run, tmp_path):
    out, _ = two_rank_run
    path = tmp_path / "step_00000003"
    shutil.copytree(out / "fsdp_sync" / "step_00000003", path)
    shard = path / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"dcp/__1_0.distcp failed its sha256 check"):
        load_model_state(path)


def test_rank_that_did_not_exist_gets_none(two_rank_run):
    out, _ = two_rank_run
    ck = Checkpointer(out / "ddp_sync", keep_last=2, rank=2, world_size=3)
    model, opt = make(seed=9)
    trainer_state, rank_state = ck.load(ck.latest(), model, opt)
    assert trainer_state == {"step": 3} and rank_state is None
    assert_tree_equal(model.state_dict(), torch.load(out / "ddp_full_model.pt", weights_only=True))


def test_fsdp_tampered_dcp_metadata_refused(two_rank_run, tmp_path):
    out, _ = two_rank_run
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "step_00000003"
    shutil.copytree(out / "fsdp_sync" / "step_00000003", path)
    (path / "dcp" / ".metadata").write_bytes(pickle.dumps(Evil()))
    rewrite_manifest(path, "dcp/.metadata")
    with pytest.raises(CheckpointError, match=r"\.metadata references (posix|os)\.system.*refused"):
        load_model_state(path)
    assert not marker.exists()


def test_enospc_inside_dcp_is_recognised_and_needs_process_group(tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException

    ck = Checkpointer(tmp_path, keep_last=1)
    wrapped = CheckpointException("save failed", {1: (OSError(errno.ENOSPC, "No space left on device"), None)})
    assert str(ck._save_error(7, wrapped)).startswith("no space left on device while writing checkpoint step 7")
    assert str(ck._save_error(7, RuntimeError("x"))).startswith("could not write checkpoint step 7")
    model, opt = make()
    with pytest.raises(CheckpointError, match="needs torch.distributed initialised"):
        save(Checkpointer(tmp_path, keep_last=1, rank=0, world_size=2), 1, model, opt)


def test_dcp_failure_is_one_checkpoint_error(two_rank_run, tmp_path):
    out, _ = two_rank_run
    path = tmp_path / "step_00000003"
    shutil.copytree(out / "fsdp_sync" / "step_00000003", path)
    (path / "dcp" / "__0_0.distcp").unlink()  # and dropped from the manifest, so only DCP notices
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["files"]["dcp/__0_0.distcp"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="could not be loaded by torch.distributed.checkpoint"):
        load_model_state(path)


def test_fsdp_checkpoint_loads_into_a_plain_model_in_one_process(two_rank_run):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    out, _ = two_rank_run
    ck = Checkpointer(out / "fsdp_sync", keep_last=2)
    model, opt = make(seed=9)
    trainer_state, rank_state = ck.load(ck.latest(), model, opt, fsdp=False)
    assert trainer_state == {"step": 3} and rank_state is not None
    assert_tree_equal(model.state_dict(), torch.load(out / "fsdp_full_model.pt", weights_only=True))
    assert_tree_equal(get_optimizer_state_dict(model, opt),
                      torch.load(out / "fsdp_full_optim.pt", weights_only=True))
    with pytest.raises(CheckpointError, match="saved without FSDP and cannot be loaded into an FSDP model"):
        Checkpointer(out / "ddp_sync", keep_last=2).load(out / "ddp_sync" / "step_00000003", model, opt, fsdp=True)
