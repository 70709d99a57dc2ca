"""Shared helpers of the trainer tests: tiny token shards, tiny configs, runs in subprocesses
(``python pretrain/train.py`` and real ``torchrun``), and reading a run's results back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:  # tests/ on sys.path (pytest); else imported as tests.helpers (python -m tests.test_x under torchrun)
    import faults
except ImportError:
    from tests import faults

from data_pipeline.shards import write_shard

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TRAIN = str(REPO / "pretrain" / "train.py")


# ---------------------------------------------------------------------------------------------
# data


def make_synthetic_shards(data_dir: Path, vocab: int = 512, train_tokens: int = 24_000, val_tokens: int = 4_000,
                          n_train_shards: int = 2, seed: int = 0) -> Path:
    """Shards of a learnable toy language (each token mostly predicts the next) over ``vocab`` ids."""
    rng = np.random.default_rng(seed)
    data_dir.mkdir(parents=True, exist_ok=True)

    def stream(n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int64)
        out[0] = 0
        jumps = rng.random(n) < 0.2
        rand = rng.integers(0, vocab, n)
        for i in range(1, n):
            out[i] = rand[i] if jumps[i] else (out[i - 1] * 7 + 3) % vocab
        return out

    write_shard(data_dir / "val_000000.bin", stream(val_tokens))
    per = train_tokens // n_train_shards
    for i in range(n_train_shards):
        write_shard(data_dir / f"train_{i:06d}.bin", stream(per))
    return data_dir


def make_text_shards(data_dir: Path, train_chars: int = 400_000, val_chars: int = 40_000) -> Path:
    """Shards of real English (Python's language reference topics) in GPT-2 tokens."""
    from pydoc_data.topics import topics

    from data_pipeline.tokenizer import get_tokenizer

    text = "\n\n".join(topics[k] for k in sorted(topics))
    tok = get_tokenizer()
    data_dir.mkdir(parents=True, exist_ok=True)
    write_shard(data_dir / "val_000000.bin", np.array(tok.encode(text[:val_chars])))
    write_shard(data_dir / "train_000000.bin", np.array(tok.encode(text[val_chars:val_chars + train_chars])))
    return data_dir


# ---------------------------------------------------------------------------------------------
# configs


def tiny_overrides(data_dir: Path, run_dir: Path, **extra) -> list[str]:
    """A 2-layer, 32-wide model on a 512-token vocabulary; 8 sequences of 32 per step."""
    base = {
        "model.preset": "tiny-vocab",
        "data.dir": str(data_dir),
        "data.seq_len": 32,
        "train.run_dir": str(run_dir),
        "train.global_batch_tokens": 256,
        "train.micro_batch_size": 2,
        "train.compile": "false",
        "train.dtype": "fp32",
        "train.device": "cpu",
        "train.log_interval": 1,
        "optim.lr": 3e-3,
        "schedule.warmup_steps": 2,
        "schedule.max_steps": 8,
        "eval.interval": 0,
        "eval.hellaswag": "false",
        "eval.sample_prompt": "",
        "checkpoint.interval": 4,
        "checkpoint.keep_last": 10,
        "distributed.timeout_s": 60,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# ---------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminal_sigint() -> None:
    """A child's ``preexec_fn``: SIGINT at its default and unblocked, as at a terminal, whatever the
    suite was started with (a process started with SIGINT ignored keeps ignoring it, and so do its
    children)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def env(fault: str | None = None) -> dict[str, str]:
    """The child's environment; ``fault`` (tests/faults.py) is injected into its trainer."""
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
             TORCHELASTIC_ERROR_FILE="", LOGLEVEL="WARNING",
             # torchrun restarts reuse a shared store whose stale keys hang the re-init (pytorch#135712).
             TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    e.pop("TORCHELASTIC_ERROR_FILE")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    if fault is not None:
        e.update(faults.child_env(fault=fault))
    return e


def python_cmd(overrides: list[str], config: str | None = None) -> list[str]:
    return [PY, TRAIN] + (["--config", config] if config else []) + overrides


def torchrun_cmd(overrides: list[str], nproc: int = 2, config: str | None = None, extra: list[str] = ()) -> list[str]:
    port = free_port()
    return [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_backend=c10d", "--monitor_interval=0.2",
            *extra, TRAIN] + (["--config", config] if config else []) + overrides


def run(cmd: list[str], timeout: float = 120, check: bool = True, fault: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=REPO, env=env(fault), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\nSTDOUT:\n{p.stdout[-4000:]}\n"
                             f"STDERR:\n{p.stderr[-6000:]}")
    return p


def start(cmd: list[str], fault: str | None = None) -> subprocess.Popen:
    """Start in a new session, so the whole tree (torchrun + workers) can be killed at once."""
    return subprocess.Popen(cmd, cwd=REPO, env=env(fault), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for(pred, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited {proc.returncode} before {what}\n{out[-6000:]}")
        time.sleep(0.1)
    if proc is not None:
        kill_tree(proc)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, _ = proc.communicate()
        raise AssertionError(f"process did not finish in {timeout}s\n{out[-6000:]}") from None
    return proc.returncode, out


# ---------------------------------------------------------------------------------------------
# results


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)]


def last_step(run_dir: Path) -> int:
    rows = metrics(run_dir)
    return rows[-1]["step"] if rows else 0


def checkpoint(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def committed(run_dir: Path, step: int) -> bool:
    return (checkpoint(run_dir, step) / "COMMITTED").exists()


def final_params(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from pretrain.checkpoint import Checkpointer

    sd, _ = Checkpointer.load_model_state(checkpoint(run_dir, step))
    return sd


def assert_params_equal(a: dict, b: dict, atol: float | None = None) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol is None:
            assert torch.equal(a[k], b[k]), f"parameter {k} differs (max {(a[k] - b[k]).abs().max():.3e})"
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


_MEMO: dict = {}


def memo(key, fn):
    """Run ``fn`` once per pytest process (reference runs shared between test files)."""
    if key not in _MEMO:
        _MEMO[key] = fn()
    return _MEMO[key]


# ---------------------------------------------------------------------------------------------
# shared reference runs (one per pytest process, reused by several test files)

STEPS = 8  # every reference-comparable run trains the tiny model for this many steps


def shared_data(tmp_path_factory) -> Path:
    return memo("data", lambda: make_synthetic_shards(tmp_path_factory.mktemp("shared-data")))


# Training recipes the equality tests run under: the default (AdamW, cosine) and the fast one's
# pieces together (Muon + AdamW, warmup-stable-decay with a 1-sqrt cool-down from step 4, a
# batch-size warmup of 128 tokens for steps 0-2, then 256). Muon's Newton-Schulz runs in fp32
# here: in bf16 (torch's default) DDP drifts from one process by ~2e-5 within 8 steps (bf16
# rounding amplifies the fp32 reduction-order differences), above the 1e-5 these tests hold.
RECIPES: dict[str, dict] = {
    "adamw": {},
    "muon-wsd": {"optim.name": "muon", "optim.muon_lr": 0.02, "optim.muon_ns_dtype": "fp32", "schedule.name": "wsd", "schedule.cooldown": "1-sqrt",
                 "schedule.cooldown_frac": 0.5, "schedule.batch_warmup_steps": 3,
                 "schedule.batch_warmup_start_tokens": 128},
}


def reference_single(tmp_path_factory, recipe: str = "adamw") -> Path:
    """One process, uninterrupted, ``STEPS`` steps (checkpoints every 4), under ``RECIPES[recipe]``."""

    def go():
        run_dir = tmp_path_factory.mktemp(f"ref-single-{recipe}")
        run(python_cmd(tiny_overrides(shared_data(tmp_path_factory), run_dir, **RECIPES[recipe])))
        return run_dir

    return memo("ref-single" if recipe == "adamw" else f"ref-single-{recipe}", go)


def reference_ddp(tmp_path_factory, recipe: str = "adamw") -> Path:
    """Two ranks (gloo DDP under torchrun), uninterrupted, ``STEPS`` steps, under ``RECIPES[recipe]``."""

    def go():
        run_dir = tmp_path_factory.mktemp(f"ref-ddp-{recipe}")
        run(torchrun_cmd(tiny_overrides(shared_data(tmp_path_factory), run_dir, **RECIPES[recipe])))
        return run_dir

    return memo("ref-ddp" if recipe == "adamw" else f"ref-ddp-{recipe}", go)
