"""Chaos soak: SIGKILL a 2-rank CPU training run again and again, resume it each time, and check
it ends bitwise equal to the same run left alone.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/chaos_soak.py --minutes 25 --kills 60 --seed 0
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/chaos_soak.py --minutes 2 --kills 5 --steps 40

A tiny GPT (``tiny-vocab``) trains on tiny generated shards under ``torchrun --nproc_per_node=2``
(gloo), checkpointing every ``--ckpt-every`` steps and evaluating every ``--eval-every``. Kills
(the whole job: torchrun and both workers, SIGKILL) are aimed, from ``random.Random(seed)``, at
training steps, evals, checkpoint saves, resumes and start-up; after ``--kills`` kills or
``--minutes`` minutes the run finishes on its own. Then the last checkpoint's model and optimizer
must ``torch.equal`` the uninterrupted reference's, and every step logged by any attempt
(replays included) must equal the reference's loss / lr / grad_norm / tokens_seen / val loss bit
for bit. Everything (the plan, where each kill landed, the verdict) goes to
``WORK/soak_log.jsonl``; the attempt logs sit next to it. Exit status 0 = equal, 1 = not.

The harness lives in tests/chaos/soak.py (shared with tests/test_chaos.py); this is its CLI.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_harness():
    chaos = REPO / "tests" / "chaos"
    sys.path.insert(0, str(chaos))  # soak imports its sibling procs.py
    sys.path.insert(0, str(REPO))
    return importlib.import_module("soak")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="stop killing after this many minutes")
    p.add_argument("--kills", type=int, default=50, help="stop killing after this many kills")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill plan (and the data)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps of the run")
    p.add_argument("--ckpt-every", type=int, default=2, help="checkpoint.interval")
    p.add_argument("--eval-every", type=int, default=3, help="eval.interval")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoint.keep_last")
    p.add_argument("--step-sleep", type=float, default=0.05, help="seconds of sleep after each step")
    p.add_argument("--slow-io", type=float, default=0.04, help="seconds of sleep after each checkpoint file")
    p.add_argument("--async-save", action="store_true", help="checkpoint.async_save=true")
    p.add_argument("--work-dir", type=Path, default=None, help="where to run (default: a fresh temp dir)")
    args = p.parse_args(argv)
    if args.kills < 0 or args.minutes <= 0 or args.steps < 1:
        p.error("--kills must be >= 0, --minutes > 0 and --steps >= 1")

    soak = _load_harness()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="chaos_soak_"))
    cfg = soak.SoakConfig(work_dir=work, max_steps=args.steps, checkpoint_interval=args.ckpt_every,
                          eval_interval=args.eval_every, keep_last=args.keep_last, kills=args.kills,
                          minutes=args.minutes, seed=args.seed, step_sleep_s=args.step_sleep,
                          slow_io_s=args.slow_io, async_save=args.async_save, attempt_timeout_s=900)
    t0 = time.time()
    try:
        res = soak.soak(cfg, say=lambda m: print(m, flush=True))
    except soak.SoakFailure as e:
        print(f"chaos_soak: FAILED: {e}\n(logs in {work})", file=sys.stderr)
        return 1
    aimed = Counter(k.aimed for k in res.kills)
    landed = Counter(f"{k.landed.get('rank0', '?').split('@')[0]}/{k.landed.get('rank1', '?').split('@')[0]}"
                     for k in res.kills)
    mid_save = sum(1 for k in res.kills if k.ckpt_tmp)
    print(json.dumps({
        "kills": len(res.kills), "attempts": res.attempts, "steps": res.steps, "final_step": res.final_step,
        "aimed": dict(aimed), "landed_rank0": res.landed_counts, "landed_rank0/rank1": dict(landed),
        "kills_with_a_half_written_checkpoint_dir": mid_save, "metric_lines_compared": res.compared_lines,
        "replayed_steps": res.replayed_lines, "chaos_wall_s": round(res.wall_s, 1),
        "reference_wall_s": round(res.reference_wall_s, 1), "total_wall_s": round(time.time() - t0, 1),
        "equal": True, "work_dir": str(work),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
