"""Submitting to the test cluster and watching jobs, the way a user does: sbatch, scontrol, the log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "launch" / "slurm"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}  # final states
STEPS = 12  # every training run here: the smoke config's model for this many steps


def train_args(data: Path, run_dir: Path, steps: int = STEPS, **extra) -> list[str]:
    """configs/smoke_cpu.yaml on the prepared corpus: a log line and metrics row every step."""
    over = {"data.dir": data, "train.run_dir": run_dir, "schedule.max_steps": steps, "schedule.warmup_steps": 2,
            "train.log_interval": 1, "eval.interval": 0, "eval.sample_tokens": 0, "checkpoint.interval": 4,
            "checkpoint.keep_last": 10, "distributed.timeout_s": 20, **extra}
    return ["configs/smoke_cpu.yaml", *(f"{k}={v}" for k, v in over.items())]


def sh(cmd: list[str], env: dict, cwd: Path | None = None, timeout: float = 60, check: bool = True):
    p = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def submit(cmd: list, env: dict, cwd: Path) -> int:
    """Runs an `sbatch ...` command line; the job id it printed."""
    out = sh(cmd, env, cwd).stdout
    m = re.search(r"Submitted batch job (\d+)", out)
    assert m, f"no job id in sbatch's output: {out!r}"
    return int(m.group(1))


def job(env: dict, jid: int | str) -> dict:
    """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, NodeList, Reason ...)."""
    out = sh(["scontrol", "show", "job", "-o", str(jid)], env).stdout.splitlines()[0]
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_state(env: dict, jid: int | str, states: set[str], timeout: float, log: Path | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        j = job(env, jid)
        if j["JobState"] in states:
            return j
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"job {jid} is {j['JobState']} ({j.get('Reason')}) after {timeout}s, "
                                 f"not {states}\n{tail}\n{controller_log(jid)}")
        time.sleep(0.3)


def controller_log(jid: int | str) -> str:
    """slurmctld's lines about a job (for a failing test's message)."""
    f = Path(os.environ.get("CLUSTER_DIR", "/tmp/gpt2-slurm")) / "log" / "slurmctld.log"
    if not f.exists():
        return ""
    pat = re.compile(rf"JobId={jid}\b|job_?id[ =:]?{jid}\b", re.I)
    return "slurmctld.log:\n" + "\n".join([x for x in f.read_text(errors="replace").splitlines() if pat.search(x)][-30:])


def wait_step(run_dir: Path, step: int, timeout: float) -> None:
    """Until the run has logged `step` (its metrics.jsonl)."""
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in rows(run_dir)):
        assert time.monotonic() < deadline, f"{run_dir} did not reach step {step} in {timeout}s"
        time.sleep(0.1)


def rows(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip() and '"loss"' in x]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (redone after a resume) must have logged the same loss."""
    out: dict[int, float] = {}
    for r in rows(run_dir):
        assert out.setdefault(r["step"], r["loss"]) == r["loss"], f"step {r['step']} logged two losses"
    return out


def model_bytes(run_dir: Path, step: int = STEPS) -> bytes:
    ck = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    assert (ck / "COMMITTED").exists(), f"{ck} is not a complete checkpoint"
    return (ck / "model.pt").read_bytes()


def checkpoints(run_dir: Path) -> list[int]:
    d = Path(run_dir) / "checkpoints"
    return sorted(int(p.name[5:]) for p in d.glob("step_*") if (p / "COMMITTED").exists()) if d.exists() else []


def multinode(site, corpus, run, *sbatch_opts, **overrides):
    """`sbatch --nodes=2 launch/slurm/train_multinode.sbatch configs/smoke_cpu.yaml ...`: (job id, log)."""
    d, env = site
    jid = submit(["sbatch", "--nodes=2", *sbatch_opts, SLURM / "train_multinode.sbatch", *train_args(corpus, run, **overrides)],
                 env, d)
    return jid, d / f"gpt2-124m-multinode-{jid}.out"


def requeue_now(env: dict, jid: int | str) -> None:
    """`scontrol requeue`, then `scontrol update StartTime=now` once the job is pending again (the
    documented way past SLURM's wait of cred_expire before a requeued job may start)."""
    sh(["scontrol", "requeue", jid], env)
    wait_state(env, jid, {"PENDING"}, 60)
    start_now(env, jid)


def start_now(env: dict, jid: int | str) -> None:
    """`scontrol update StartTime=now` for a requeued job that is PENDING, no sooner than the second
    after its last life ended: slurmd refuses a credential made in the same second as the previous
    life's revocation (it compares whole seconds: "Killing non-startable batch JobId=J: Job
    credential revoked", seen when a FAILED job was requeued and started within 0.1 s)."""
    time.sleep(1.1)
    sh(["scontrol", "update", f"JobId={jid}", "StartTime=now"], env)


def node_pids(node: str, pattern: str) -> list[int]:
    """The processes inside a node's network namespace whose command line contains `pattern`."""
    out = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True).stdout.split()
    pids = []
    for p in out:
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if pattern in cmd:
            pids.append(int(p))
    return pids
