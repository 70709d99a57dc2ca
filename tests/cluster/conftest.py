"""A real SLURM cluster for the launcher tests: two compute nodes (slurmd) and a controller, each in
a network namespace of this machine on a private bridge (10.77.0.0/24), brought up once per session
by ``launch/slurm/local_cluster.sh`` (the same script users run) and torn down completely at the end,
also when a test fails or the run is interrupted.

Needs root, network namespaces and Debian's ``slurm-wlm``/``munge`` (installed by name here where
missing, once; ``iptables`` too, for the lossy-network test). Elsewhere every cluster test skips with
one line saying why.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from sjobs import DONE, SLURM, multinode, submit, wait_state

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "slurm" / "local_cluster.sh"
CLUSTER_DIR = Path("/tmp/gpt2-slurm")
LOCK = Path("/tmp/gpt2-slurm.lock")  # one cluster per machine: its names and addresses are fixed
NODES = ("gpt2-n1", "gpt2-n2")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.cluster)


def _why_not() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "cluster tests need Linux"
    if os.geteuid() != 0:
        return "cluster tests need root (network namespaces, slurmd); run them as root or in CI"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"cluster tests need `{tool}` (apt-get install iproute2 util-linux)"
    if subprocess.run(["unshare", "--net", "--uts", "true"], capture_output=True).returncode != 0:
        return "cluster tests need network and UTS namespaces (unshare --net --uts failed here)"
    return None


# The commands the cluster tests run -> the Debian package that has each (installed by name where missing,
# once: a later session finds them). The cluster needs REQUIRED; iptables only serves the lossy-network
# test, which skips without it.
REQUIRED = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm", "munged": "munge"}
OPTIONAL = {"iptables": "iptables"}


def _apt_get(packages: list[str]) -> str | None:
    """apt-get install PACKAGES by name (after an update if the first try fails); why not, or None."""
    if shutil.which("apt-get") is None:
        return f"cluster tests need {' and '.join(packages)} (no apt-get here to install them)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", *packages]
    if subprocess.run(cmd, env=env, capture_output=True).returncode == 0:
        return None
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    return None if p.returncode == 0 else f"apt-get install {' '.join(packages)} failed: {p.stderr.strip().splitlines()[-1:]}"


def _install_packages() -> str | None:
    """The packages whose commands are missing, installed; the reason the cluster cannot run, or None."""
    for wanted in (REQUIRED, OPTIONAL):
        missing = sorted({pkg for cmd, pkg in wanted.items() if shutil.which(cmd) is None})
        why = _apt_get(missing) if missing else None
        if why and wanted is REQUIRED:
            return why
    return None


def _down(env: dict) -> None:
    subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The cluster, up: yields the environment (SLURM_CONF ...) for sbatch/srun/scontrol."""
    why = _why_not() or _install_packages()
    if why:
        pytest.skip(why)
    lock = open(LOCK, "w")
    fcntl.lockf(lock, fcntl.LOCK_EX)  # another session's cluster tests: wait for them to finish
    env = dict(os.environ, CLUSTER_DIR=str(CLUSTER_DIR))
    _down(env)  # a session killed outright (SIGKILL) left its cluster: clear it first
    done = []

    def teardown():
        if not done:
            done.append(1)
            _down(env)
            lock.close()

    atexit.register(teardown)
    old_term = signal.signal(signal.SIGTERM, lambda *_: (teardown(), os._exit(143)))
    try:
        p = subprocess.run(["bash", str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            pytest.fail(f"local_cluster.sh up failed:\n{p.stderr[-3000:]}")
        env["SLURM_CONF"] = str(CLUSTER_DIR / "slurm.conf")
        yield env
    finally:
        teardown()
        signal.signal(signal.SIGTERM, old_term)


@pytest.fixture(scope="session")
def site(slurm_cluster, tmp_path_factory):
    """The submit directory (logs land here) and the job environment: the user's, with the launchers'
    own defaults (OMP_NUM_THREADS unset), REPO_DIR naming the checkout (launch/README.md, section 0)."""
    d = tmp_path_factory.mktemp("submit")
    env = dict(slurm_cluster, REPO_DIR=str(REPO), PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)
    return d, env


@pytest.fixture(scope="session")
def corpus(site):
    """`sbatch launch/slurm/prepare.sbatch builtin:python-docs DIR --val-tokens 65536`, as documented."""
    d, env = site
    out = d / "python-docs"
    jid = submit(["sbatch", SLURM / "prepare.sbatch", "builtin:python-docs", out, "--val-tokens", "65536"], env, d)
    log = d / f"gpt2-prepare-{jid}.out"
    j = wait_state(env, jid, DONE, 90, log)
    text = log.read_text()
    assert j["JobState"] == "COMPLETED", text
    assert (out / "manifest.json").exists()
    # progress lines, not progress bars: no carriage returns, no tqdm bars in the job's log
    assert "\r" not in text and "it/s]" not in text, text[-2000:]
    return out


@pytest.fixture(scope="session")
def two_nodes(site, corpus, tmp_path_factory):
    """An uninterrupted 2-node run: `sbatch --nodes=2 launch/slurm/train_multinode.sbatch ...`."""
    _, env = site
    run = tmp_path_factory.mktemp("two-nodes") / "run"
    jid, log = multinode(site, corpus, run)
    j = wait_state(env, jid, DONE, 120, log)
    return run, jid, j, log.read_text()
