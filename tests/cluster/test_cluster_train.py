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


def _preempted_run(site, corpus, tmp_path, two_nodes, signal_it):
    """A 2-node run, interrupted at step >= 3 by `signal_it(jid)`; it must be requeued, resume from
    its checkpoint and end bitwise equal to the uninterrupted run."""
    _, env = site
    run = tmp_path / "run"
    jid, log = multinode(site, corpus, run)
    wait_state(env, jid, {"RUNNING"} | DONE, 30, log)
    wait_step(run, 3, 60)
    signal_it(env, jid)
    j = wait_state(env, jid, DONE, 120, log)
    text = log.read_text()
    assert (j["JobState"], j["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:]
    assert int(j["Restarts"]) == 1
    # both lives in the one log: the first stopped with a checkpoint, the second resumed from it
    assert f"job {jid} (gpt2-124m-multinode) restart 0:" in text and f"job {jid} (gpt2-124m-multinode) restart 1:" in text
    # the second life continued from the first's checkpoint: its first step is the one after it
    second = text.split("restart 1:", 1)[1]
    first_step = int(re.search(r"^step +(\d+) \|", second, re.M).group(1))
    assert first_step > 1 and first_step - 1 in checkpoints(run), second[-3000:]
    ref_run = two_nodes[0]
    assert losses_by_step(run) == losses_by_step(ref_run)
    assert model_bytes(run) == model_bytes(ref_run)
    return text


def test_scontrol_requeue_resumes_bitwise(site, corpus, tmp_path, two_nodes):
    """The scheduler's requeue (preemption with PreemptMode=REQUEUE, an admin's requeue): SIGTERM to
    every process, then the job pending again; StartTime=now skips the credential wait."""

    def requeue(env, jid):
        sh(["scontrol", "requeue", jid], env)
        # only a PENDING job takes a new start time (while its processes end it is COMPLETING)
        wait_state(env, jid, {"PENDING"}, 30)
        sh(["scontrol", "update", f"JobId={jid}", "StartTime=now"], env)

    text = _preempted_run(site, corpus, tmp_path, two_nodes, requeue)
    assert "Traceback" not in text, text[-4000:]


def test_usr1_to_batch_shell_requeues_itself(site, corpus, tmp_path, two_nodes):
    """What `#SBATCH --signal=B:USR1@120` does before the time limit: SIGUSR1 to the batch shell
    only. The launcher passes it to the ranks, they checkpoint, the launcher requeues the job
    (with StartTime=now: no 2-minute credential wait) and the requeued job resumes."""

    def usr1(env, jid):
        sh(["scancel", "--signal=USR1", "--batch", jid], env)

    text = _preempted_run(site, corpus, tmp_path, two_nodes, usr1)
    assert "preempted: requeueing job" in text
    assert "Traceback" not in text, text[-4000:]

