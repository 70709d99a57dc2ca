"""Lock soak: two trainers started on one run directory at random offsets, again and again;
every time exactly one trains, the other exits 2 within seconds, and the survivor's
checkpoints and metrics equal an undisturbed run's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/run_dir_lock_soak.py --trials 20 --seed 0
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/run_dir_lock_soak.py --trials 2      # (tests/test_run_dir.py)

A tiny GPT (``tiny-vocab``, CPU, one process each) trains ``--steps`` steps on generated shards,
checkpointing every 4 and sleeping ``--step-sleep`` s per step (the test fault ``sleep:``) so
that the second trainer, started ``uniform(0, --max-offset)`` s after the first, arrives while
the first still runs. Per trial: a fresh run directory; trainer A, then B after the offset.
Pass: one exits 0 and the other exits 2 with one ``is in use by another trainer`` line; the
winner's checkpoints (model weights of each, torch.equal) and metrics.jsonl (step, loss, lr,
grad_norm, tokens_seen, bit for bit) equal the reference run's (same command, alone). Exit
status 0 = every trial passed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("step", "loss", "lr", "grad_norm", "tokens_seen")


def _helpers():
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO))
    import helpers

    return helpers


def run_metrics(run: Path) -> list[tuple]:
    return [tuple(json.loads(line).get(k) for k in KEYS) for line in (run / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run: Path) -> dict[str, dict]:
    from pretrain.checkpoint import Checkpointer

    out = {}
    for p in sorted((run / "checkpoints").glob("step_*")):
        out[p.name] = Checkpointer.load_model_state(p)[0]
    return out


def same_checkpoints(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(
        a[n].keys() == b[n].keys() and all(torch.equal(a[n][k], b[n][k]) for k in a[n]) for n in a)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="seed of the offsets")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--step-sleep", type=float, default=0.25, help="seconds each step sleeps (keeps A running)")
    p.add_argument("--max-offset", type=float, default=2.0, help="B starts uniform(0, this) s after A")
    p.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = p.parse_args(argv)
    h = _helpers()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lock_soak_"))
    data = h.make_synthetic_shards(work / "data")
    fault = f"sleep:{args.step_sleep}"  # tests/faults.py, in each trainer

    def cmd(run: Path) -> list[str]:
        over = h.tiny_overrides(data, run, **{"schedule.max_steps": args.steps, "checkpoint.interval": 4})
        return [h.PY, h.TRAIN, *over]

    ref = work / "reference"
    t0 = time.perf_counter()
    h.run(cmd(ref), timeout=300, fault=fault)
    print(f"reference: {args.steps} steps in {time.perf_counter() - t0:.1f}s", flush=True)
    ref_metrics, ref_ckpts = run_metrics(ref), checkpoints(ref)

    rng = random.Random(args.seed)
    passed, loser_s, startup_s, log = 0, [], [], []
    for i in range(args.trials):
        run = work / f"trial_{i:02d}"
        offset = rng.uniform(0, args.max_offset)
        starts = {}
        procs = {}
        starts["A"], wall_a = time.perf_counter(), time.time()
        logs = {n: (work / f"trial_{i:02d}_{n}.out", work / f"trial_{i:02d}_{n}.err") for n in "AB"}

        def launch(name: str, logs=logs, run=run) -> subprocess.Popen:
            out, err = logs[name]
            with open(out, "w") as fo, open(err, "w") as fe:  # files, not pipes: nothing can block
                return subprocess.Popen(cmd(run), cwd=REPO, env=h.env(fault), stdout=fo, stderr=fe)

        procs["A"] = launch("A")
        time.sleep(offset)
        starts["B"] = time.perf_counter()
        procs["B"] = launch("B")
        ended: dict[str, float] = {}
        deadline = time.perf_counter() + 300
        while len(ended) < 2 and time.perf_counter() < deadline:  # each one's own exit time
            for name, pr in procs.items():
                if name not in ended and pr.poll() is not None:
                    ended[name] = time.perf_counter()
            time.sleep(0.05)
        res = {}
        for name, pr in procs.items():
            if pr.poll() is None:
                pr.kill()
            pr.wait()
            out, err = (f.read_text() for f in logs[name])
            res[name] = (pr.returncode, out, err, ended.get(name, float("nan")) - starts[name])
        codes = sorted(r[0] for r in res.values())
        problems = []
        if codes != [0, 2]:
            problems.append(f"exit codes {codes}, expected one 0 and one 2")
        else:
            winner = next(n for n, r in res.items() if r[0] == 0)
            loser = "B" if winner == "A" else "A"
            err_lines = res[loser][2].strip().splitlines()
            if len(err_lines) != 1 or "is in use by another trainer" not in err_lines[0]:
                problems.append(f"loser's stderr is not one lock line: {res[loser][2][-500:]!r}")
            # The loser's wall time is mostly its own Python/torch start-up and checks: compare
            # with the winner's start-up, from spawn to the end of its first step.
            loser_s.append(res[loser][3])
            first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["time"]
            start_s = first - (wall_a if winner == "A" else wall_a + (starts["B"] - starts["A"]))
            startup_s.append(start_s)
            if run_metrics(run) != ref_metrics:
                problems.append("metrics differ from the reference")
            if not same_checkpoints(checkpoints(run), ref_ckpts):
                problems.append("checkpoints differ from the reference")
        ok = not problems
        passed += ok
        entry = {"trial": i, "offset_s": round(offset, 3), "codes": {n: r[0] for n, r in res.items()},
                 "winner_first_step_s": round(startup_s[-1], 2) if startup_s and ok else None,
                 "seconds": {n: round(r[3], 2) for n, r in res.items()}, "ok": ok, "problems": problems}
        log.append(entry)
        print(json.dumps(entry), flush=True)
    (work / "lock_soak_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    if loser_s:
        print(f"refused trainer's wall time (spawn to exit 2): median {statistics.median(loser_s):.2f}s, "
              f"max {max(loser_s):.2f}s; the winner's spawn to end of its first step: median "
              f"{statistics.median(startup_s):.2f}s, max {max(startup_s):.2f}s")
    print(f"{passed}/{args.trials} trials passed (log: {work / 'lock_soak_log.jsonl'})")
    return 0 if passed == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
