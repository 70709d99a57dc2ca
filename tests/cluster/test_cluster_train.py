"""The SLURM launchers on a real 2-node SLURM cluster (tests/cluster/conftest.py), run the way
launch/README.md tells a user to: sbatch from a submit directory with REPO_DIR, the smoke config on
the embedded corpus (builtin:python-docs, prepared by prepare.sbatch)."""

from __future__ import annotations

import re
import subprocess

import pytest
from sjobs import (
    DONE,
    REPO,
    SLURM,
    STEPS,
    checkpoints,
    losses_by_step,
    model_bytes,
    multinode,
    sh,
    start_now,
    submit,
    train_args,
    wait_state,
    wait_step,
)


@pytest.fixture(scope="session")
def local_2proc(site, corpus, tmp_path_factory):
    """The same config, 2 processes on one host: `launch/local.sh --nproc 2` (no SLURM)."""
    _, env = site
    run = tmp_path_factory.mktemp("local2") / "run"
    env = {k: v for k, v in env.items() if not k.startswith("SLURM")}
    p = subprocess.run(["bash", "launch/local.sh", "--nproc", "2", *train_args(corpus, run)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "OMP_NUM_THREADS=1" in p.stderr
    return run


def test_train_sbatch_one_node(site, corpus, tmp_path):
    d, env = site
    run = tmp_path / "run"
    jid = submit(["sbatch", SLURM / "train.sbatch", *train_args(corpus, run, steps=8)], env, d)
    log = d / f"gpt2-124m-{jid}.out"
    j = wait_state(env, jid, DONE, 90, log)
    text = log.read_text()
    assert (j["JobState"], j["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    assert "1 node(s) x 1 process(es)" in text and "OMP_NUM_THREADS=1" in text
    losses = losses_by_step(run)
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1] - 1.0
    assert checkpoints(run) == [4, 8]


def test_two_nodes_equal_two_processes_on_one_host(two_nodes, local_2proc):
    run, jid, j, text = two_nodes
    assert (j["JobState"], j["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    assert j["NodeList"] == "gpt2-n[1-2]"
    # the rendezvous ran on the first node's bridge address, both nodes joined it
    assert "2 node(s) x 1 process(es), rendezvous 10.77.0.11:" in text
    assert "world size 2" in text
    assert losses_by_step(run) == losses_by_step(local_2proc)
    assert sorted(losses_by_step(run)) == list(range(1, STEPS + 1))
    assert model_bytes(run) == model_bytes(local_2proc)


def test_preemption_three_ways_resumes_bitwise(site, corpus, tmp_path, two_nodes):
    """One 2-node job preempted three times, each the way a cluster does it, each life resumed:
    1. `scontrol requeue` (an admin; a preemption with PreemptMode=REQUEUE): SIGTERM to every
       process, the job pending again;
    2. SIGUSR1 to the batch shell only (what `#SBATCH --signal=B:USR1@120` does before the time
       limit): the launcher passes it to the ranks, they checkpoint, it requeues the job;
    3. SIGTERM to the job's steps only (`sbatch --signal=TERM@T`, `scancel --signal=TERM`): the
       ranks checkpoint, torchrun says so in one line, the launcher requeues the job.
    After each, `scontrol update StartTime=now` once it is PENDING (SLURM's documented wait).
    The job ends COMPLETED, its one log shows the four lives, each starting right after the
    previous one's checkpoint, no traceback, and the result is bitwise the uninterrupted run's."""
    _, env = site
    run = tmp_path / "run"
    jid, log = multinode(site, corpus, run)
    ways = [["scontrol", "requeue", jid], ["scancel", "--signal=USR1", "--batch", jid],
            ["scancel", "--signal=TERM", jid]]
    stops = [0]
    for cmd in ways:
        wait_step(run, stops[-1] + 2, 120)  # this life has trained two steps
        sh(cmd, env)
        wait_state(env, jid, {"PENDING"}, 60, log)
        start_now(env, jid)
        stops.append(checkpoints(run)[-1])
    j = wait_state(env, jid, DONE, 120, log)
    text = log.read_text()
    assert (j["JobState"], j["ExitCode"], j["Restarts"]) == ("COMPLETED", "0:0", "3"), f"{j}\n{text[-4000:]}"
    assert stops == sorted(set(stops)) and stops[-1] < STEPS, stops
    for life in (1, 2, 3):
        after = text.split(f"job {jid} (gpt2-124m-multinode) restart {life}:", 1)[1]
        first_step = int(re.search(r"^step +(\d+) \|", after, re.M).group(1))
        assert first_step == stops[life] + 1, (life, first_step, stops)  # resumed, not started over
    assert "torchrun: stopped by SIGUSR1" in text and "torchrun: stopped by SIGTERM" in text
    assert text.count("preempted: requeueing job") == 2  # the launcher's own requeues: USR1, TERM
    assert "Traceback" not in text, text[-4000:]
    ref_run = two_nodes[0]
    assert losses_by_step(run) == losses_by_step(ref_run)
    assert model_bytes(run) == model_bytes(ref_run)
