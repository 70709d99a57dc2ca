"""The run directory: one trainer at a time (an OS lock), nothing lost on overwrite, Ctrl-C keeps
the work, and the argument order of ``--resume``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import pytest
import torch
from helpers import (
    PY,
    REPO,
    TRAIN,
    env,
    finish,
    make_synthetic_shards,
    metrics,
    start,
    tiny_overrides,
    wait_for,
)

from pretrain.rundir.lock import LOCK_NAME, RunDirBusy, RunDirLock
from pretrain.train import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("data"))


def hold_lock(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([PY, "-c", "import time; from pretrain.rundir.lock import RunDirLock; "
                          f"RunDirLock({str(run_dir)!r}).acquire('holder'); print('held', flush=True); time.sleep(600)"],
                         cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def can_lock_elsewhere(run_dir: Path) -> bool:
    """Whether another process could take the lock now (a POSIX lock never conflicts with its own process)."""
    code = (f"from pretrain.rundir.lock import RunDirLock, RunDirBusy\ntry:\n    RunDirLock({str(run_dir)!r}).acquire()\n"
            "except RunDirBusy:\n    raise SystemExit(3)")
    return subprocess.run([PY, "-c", code], cwd=REPO, env=env()).returncode == 0


def test_lock_names_the_holder_and_frees_itself_when_the_holder_dies(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(RunDirBusy, match=rf"in use by another trainer \(host \S+, PID {holder.pid}, started "):
            RunDirLock(tmp_path / "run").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup code runs: the kernel drops the lock
        holder.wait()
    with RunDirLock(tmp_path / "run") as lock:
        assert lock.held and f'"pid": {os.getpid()}' in (tmp_path / "run" / LOCK_NAME).read_text()
    assert (tmp_path / "run" / LOCK_NAME).read_text() == ""  # released: no stale holder name


def test_trainer_holds_the_lock_while_it_runs_and_releases_it_on_every_exit(data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    seen = []

    class Probe:  # runs inside training: is the directory locked against other processes?
        name = "probe"

        def __call__(self, model, step):
            seen.append(can_lock_elsewhere(run))
            return {}

    monkeypatch.setattr("pretrain.train.build_evaluators", lambda plan, rank, world, device: [Probe()])
    assert main(tiny_overrides(data, run, **{"schedule.max_steps": 2, "eval.interval": 2})) == 0
    assert seen == [False]
    assert can_lock_elsewhere(run)  # released after a clean run
    # ... and after a failure inside training (a non-finite run: exit 1)
    faults.install("nan_from:0", monkeypatch.setattr)
    over = tiny_overrides(data, tmp_path / "nan", **{"train.max_nonfinite_in_a_row": 2})
    assert main(over) == 1
    assert can_lock_elsewhere(tmp_path / "nan")


def test_overwrite_moves_the_whole_previous_run_aside(data, tmp_path, capsys):
    over = tiny_overrides(data, tmp_path, **{"schedule.max_steps": 4})
    assert main(over) == 0
    (tmp_path / "eval_results.json").write_text('{"hellaswag/acc": 0.25}\n')
    old = {n: (tmp_path / n).read_bytes() for n in ("metrics.jsonl", "config.yaml", "eval_results.json")}
    capsys.readouterr()
    assert main(tiny_overrides(data, tmp_path, **{"schedule.max_steps": 2, "checkpoint.overwrite": "true"})
                + ["--resume", "none"]) == 0
    asides = list(tmp_path.glob("overwritten-*"))
    assert len(asides) == 1 and str(asides[0]) in capsys.readouterr().out
    aside = asides[0]
    for name, content in old.items():  # the kept run is whole: its history, config and evals
        assert (aside / name).read_bytes() == content, name
    assert (aside / "checkpoints" / "step_00000004" / "COMMITTED").exists()
    assert [r["step"] for r in metrics(aside)] == [1, 2, 3, 4]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    assert {"environment.json", "report.md", "loss.png"} <= {p.name for p in aside.iterdir()}  # the old run's too
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [LOCK_NAME, aside.name, "checkpoints", "config.yaml", "metrics.jsonl", "environment.json", "report.md",
         "loss.png"])


def test_resume_auto_may_be_followed_by_more_overrides(data, tmp_path, capsys):
    # overrides, then --resume, then more overrides (what launchers append to a user's command)
    argv = [*tiny_overrides(data, tmp_path), "--resume", "auto", "optim.lr=0.0123", "--print-config"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0123" in out and "resume: auto" in out


def _start_slow_run(data, run: Path, sleep: float) -> subprocess.Popen:
    over = tiny_overrides(data, run, **{"schedule.max_steps": 1000, "checkpoint.interval": 1000})
    return start([PY, TRAIN, *over], fault=f"sleep:{sleep}")


def test_ctrl_c_finishes_the_step_checkpoints_and_exits_130(data, tmp_path):
    run = tmp_path / "run"
    p = _start_slow_run(data, run, 0.2)
    wait_for(lambda: len(metrics(run)) >= 2, 120, p, "two logged steps")
    # Twice within milliseconds, as a torchrun worker gets it (the tty's and torchrun's): one Ctrl-C.
    os.kill(p.pid, signal.SIGINT)
    time.sleep(0.05)
    os.kill(p.pid, signal.SIGINT)
    rc, out = finish(p, 60)
    assert rc == 130, out
    step = metrics(run)[-1]["step"]
    assert (run / "checkpoints" / f"step_{step:08d}" / "COMMITTED").exists(), out
    assert "Traceback" not in out
    resume = [ln for ln in out.splitlines() if "resume with:" in ln]
    assert len(resume) == 1 and resume[0].endswith("--resume auto") and "gpt2-train" in resume[0], out
    assert can_lock_elsewhere(run)


def test_a_second_ctrl_c_aborts_at_once(data, tmp_path):
    run = tmp_path / "run"
    p = _start_slow_run(data, run, 5.0)  # each step then sleeps 5 s: a graceful stop takes >= 5 s
    wait_for(lambda: len(metrics(run)) >= 1, 120, p, "one logged step")
    os.kill(p.pid, signal.SIGINT)
    time.sleep(1.3)
    t0 = time.perf_counter()
    os.kill(p.pid, signal.SIGINT)
    rc, out = finish(p, 60)
    assert rc == 130 and time.perf_counter() - t0 < 2.5, out
    assert "aborted (Ctrl-C)" in out and "Traceback" not in out, out
    assert can_lock_elsewhere(run)


def test_ctrl_c_during_an_evaluation_stops_it_saves_and_exits_130(data, tmp_path, monkeypatch, capsys):
    """A Ctrl-C that lands in a long evaluation does not wait for it: the evaluator sees the stop
    between its batches and returns, the step is saved, and the run exits 130 within seconds
    (before: the whole evaluation first). The real val-loss evaluator, given ``stop``, returns {}."""
    from evals.val_loss import ValLossEvaluator

    run, batches = tmp_path / "run", []

    class SlowEval:  # 100 "batches" of 0.1 s: 10 s if it were not interrupted
        name, interruptible = "slow", True

        def __call__(self, model, step, stop=None):
            for b in range(100):
                if b == 3:
                    signal.raise_signal(signal.SIGINT)  # Ctrl-C arrives mid-evaluation
                if stop():
                    return {}
                batches.append(b)
                time.sleep(0.1)
            return {"slow/done": 1.0}

    monkeypatch.setattr("pretrain.train.build_evaluators", lambda plan, rank, world, device: [SlowEval()])
    t0 = time.perf_counter()
    rc = main(tiny_overrides(data, run, **{"schedule.max_steps": 8, "eval.interval": 2, "checkpoint.interval": 8}))
    assert rc == 130 and time.perf_counter() - t0 < 8, capsys.readouterr().err
    assert len(batches) == 3 and (run / "checkpoints" / "step_00000002" / "COMMITTED").exists()
    assert metrics(run)[-1]["step"] == 2 and "slow/done" not in metrics(run)[-1]
    ev = ValLossEvaluator(data, 32, 2, None)
    assert ev(torch.nn.Module(), 0, stop=lambda: True) == {}  # stopped before its first batch


def test_ctrl_c_during_start_up_is_one_line_exit_130(monkeypatch, capsys):
    import pretrain.train as train_mod

    def interrupted(argv=None):
        raise KeyboardInterrupt  # as while torch is being imported

    monkeypatch.setattr(train_mod, "main", interrupted)
    with pytest.raises(SystemExit) as e:
        train_mod.cli()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 130 and err == ["gpt2-train: interrupted (Ctrl-C) during start-up; nothing was written"]


@pytest.mark.slow  # ~1 min on a shared 2-core machine: three trainer processes per trial
def test_lock_soak_short(tmp_path):
    """Two trainers on one run directory, twice: one trains, the other exits 2 (the full soak,
    20 trials, is benchmarks/run_dir_lock_soak.py)."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_dir_lock_soak.py"), "--trials", "2",
                        "--workdir", str(tmp_path)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "2/2 trials" in r.stdout
