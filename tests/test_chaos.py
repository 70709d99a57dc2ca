"""Chaos: a 2-rank CPU training run, SIGKILLed (torchrun and its workers) during steps, evals and
checkpoint saves and restarted with ``--resume auto`` each time, ends bitwise equal to the run
left alone -- final model and optimizer tensors, and every logged step, replays included.

The default test is short (3 aimed kills, ~1-2 minutes on 2 busy cores). The long soak is
``pytest -m slow tests/test_chaos.py`` (CHAOS_SOAK_MINUTES, CHAOS_SOAK_KILLS) or, with more
control, ``python benchmarks/chaos_soak.py --minutes 25 --kills 60 --seed 0``. The harness is
tests/chaos/soak.py.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "chaos"))
import soak  # noqa: E402  (tests/chaos/soak.py)


@pytest.fixture(scope="module")
def short_soak(tmp_path_factory):
    cfg = soak.SoakConfig(work_dir=tmp_path_factory.mktemp("chaos"), max_steps=16, kills=3, seed=0,
                          aim=["checkpoint", "eval", "train"])
    return soak.soak(cfg, say=print), cfg


def test_sigkilled_training_resumes_bitwise_equal_to_an_uninterrupted_run(short_soak):
    res, cfg = short_soak
    assert len(res.kills) == 3, [k.aimed for k in res.kills]
    assert res.final_step == cfg.max_steps
    # Where the kills landed (rank 0), e.g. {"checkpoint": 1, "eval": 1, "train": 1}: the aimed
    # phases; a kill aimed at a checkpoint save lands inside it (the save is stretched by slow_io).
    assert res.landed_counts.get("checkpoint", 0) >= 1, res.landed_counts
    assert res.compared_lines >= cfg.max_steps
    log = [json.loads(x) for x in (cfg.work_dir / "soak_log.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "kill" for e in log) == 3 and log[-1]["event"] == "result"


def test_the_comparison_catches_a_one_ulp_difference(short_soak, tmp_path):
    """The equality check is real: nudge one logged loss by one ulp and it fails, naming the step."""
    _, cfg = short_soak
    ref, fake = cfg.work_dir / "reference", tmp_path / "chaos"
    shutil.copytree(ref, fake)
    lines = (fake / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[4])
    rec["loss"] = math.nextafter(rec["loss"], math.inf)
    lines[4] = json.dumps(rec)
    (fake / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(soak.SoakFailure, match=rf"step {rec['step']} .*loss"):
        soak.compare_runs(ref, fake)
    shutil.rmtree(fake)
    shutil.copytree(ref, fake)  # and a missing step
    lines = (fake / "metrics.jsonl").read_text().splitlines()
    (fake / "metrics.jsonl").write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    with pytest.raises(soak.SoakFailure, match="never logged"):
        soak.compare_runs(ref, fake)


@pytest.mark.slow
def test_long_chaos_soak(tmp_path, request):
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("the long soak runs only when selected: pytest -m slow tests/test_chaos.py")
    minutes = float(os.environ.get("CHAOS_SOAK_MINUTES", "20"))
    kills = int(os.environ.get("CHAOS_SOAK_KILLS", "50"))
    cfg = soak.SoakConfig(work_dir=tmp_path, max_steps=int(os.environ.get("CHAOS_SOAK_STEPS", "400")),
                          kills=kills, minutes=minutes, seed=int(os.environ.get("CHAOS_SOAK_SEED", "0")),
                          attempt_timeout_s=900)
    res = soak.soak(cfg, say=print)
    assert len(res.kills) >= min(kills, 10)
    assert res.final_step == cfg.max_steps
