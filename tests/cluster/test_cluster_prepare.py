"""prepare_array.sbatch on the real cluster: the array and its dependent merge, a task that fails,
the merge left pending, and the rerun of the same command that completes it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

from sjobs import REPO, SLURM, job, sh, wait_state


def _corpus_files(d):
    """The embedded corpus's text (Python's documentation topics) as 4 jsonl files: a splittable source."""
    from pydoc_data.topics import topics

    d.mkdir()
    keys = sorted(topics)
    for i in range(4):
        (d / f"part{i}.jsonl").write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in keys[i::4]))
    return f"{d}/*.jsonl"


def _shards(out):
    m = json.loads((out / "manifest.json").read_text())
    return [(s["split"], s["sha256"]) for s in m["shards"]]


def test_prepare_array_failed_task_keeps_merge_pending_until_rerun(site, tmp_path):
    d, env = site
    source = _corpus_files(tmp_path / "src")
    out = tmp_path / "out"
    blocker = out / "train_t00001_000000.bin"  # task 1 finds a foreign shard there: it fails (exit 2)
    (blocker / "x").mkdir(parents=True)
    cmd = ["bash", SLURM / "prepare_array.sbatch", "--tasks", "2", source, out, "--val-tokens", "4096"]
    first = re.search(r"array (\d+) merge (\d+)", sh(cmd, env, d).stdout)
    assert first, "prepare_array.sbatch printed no 'array <id> merge <id>'"
    array, merge = first.groups()
    assert wait_state(env, f"{array}_0", {"COMPLETED", "FAILED"}, 60)["JobState"] == "COMPLETED"
    assert wait_state(env, f"{array}_1", {"COMPLETED", "FAILED"}, 60)["JobState"] == "FAILED"
    task_log = (d / "logs" / f"gpt2-prepare-array-{array}_1.out").read_text()
    assert "gpt2-prepare: error: " in task_log and "Traceback" not in task_log, task_log
    deadline = time.monotonic() + 20  # the scheduler marks the dependency at its next pass
    while (j := job(env, merge))["Reason"] != "DependencyNeverSatisfied" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert (j["JobState"], j["Reason"]) == ("PENDING", "DependencyNeverSatisfied"), j
    assert not (out / "manifest.json").exists()

    shutil.rmtree(blocker)
    again = re.search(r"array (\d+) merge (\d+)", sh(cmd, env, d).stdout)
    assert again and again.group(2) == merge, "the rerun must re-point the pending merge, not queue a second"
    j = wait_state(env, merge, {"COMPLETED", "FAILED", "CANCELLED"}, 90, d / "logs" / f"gpt2-prepare-merge-{merge}.out")
    assert j["JobState"] == "COMPLETED", j
    # the same shards as the same split run on one machine
    local = tmp_path / "local"
    p = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", source, local, "--tasks", "2", "--local",
                        "--workers", "1", "--val-tokens", "4096", "--no-progress"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert _shards(out) == _shards(local)
    assert job(env, merge)["ExitCode"] == "0:0"
