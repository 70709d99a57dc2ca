"""The chaos soak: a 2-rank CPU training run SIGKILLed (torchrun and its workers) again and again
at seeded-random moments -- during steps, evals, checkpoint saves and resumes -- and restarted
with ``--resume auto`` each time, must end bitwise equal to the same run left alone:

* the last checkpoint's model and optimizer tensors ``torch.equal`` the reference's;
* every step's logged ``loss`` / ``lr`` / ``grad_norm`` / ``tokens_seen`` (and ``val/loss`` on
  eval steps) in ``metrics.jsonl`` equals the reference's, bit for bit -- including the steps
  logged more than once because a kill made the run replay them from its last checkpoint;
* every step of the reference is logged at least once, no line is torn, no ``*.tmp`` is left.

Used by ``tests/test_chaos.py`` (short and ``slow`` variants) and ``benchmarks/chaos_soak.py``
(the CLI). Kill times come from ``random.Random(seed)``; the plan and every kill (where it was
aimed, where it landed on each rank, the last logged step) are written to ``soak_log.jsonl``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faults
import numpy as np
import procs
import torch
import yaml

ENTRY = Path(__file__).with_name("train_entry.py")
# How long after entering the aimed phase the kill comes (seconds, uniform in [0, max]); a
# "train" kill lands anywhere in the next few steps, the others inside the phase.
PHASE_DELAY = {"train": 1.0, "eval": 0.04, "checkpoint": 0.08, "load": 0.03, "startup": 4.0}
PHASE_WEIGHT = {"train": 4, "eval": 2, "checkpoint": 3, "load": 1, "startup": 1}
COMPARED_KEYS = ("loss", "lr", "grad_norm", "tokens_seen", "val/loss", "val/tokens")


@dataclass
class SoakConfig:
    work_dir: Path
    max_steps: int = 12
    checkpoint_interval: int = 2
    eval_interval: int = 3
    keep_last: int = 2
    kills: int = 4
    minutes: float | None = None
    """Stop killing after this many minutes (the run then finishes on its own)."""
    seed: int = 0
    seq_len: int = 32
    micro_batch_size: int = 2
    global_batch_seqs: int = 8
    val_tokens: int = 8192
    slow_io_s: float = 0.04
    """Sleep after each checkpoint file write (widens the half-written-checkpoint window)."""
    step_sleep_s: float = 0.05
    """The fault sleep:S (tests/faults.py; after each step): stretches the run so kills land all over it."""
    aim: list[str] = field(default_factory=list)
    """Phases the first kills aim at, in order (the rest are drawn from PHASE_WEIGHT)."""
    async_save: bool = False
    attempt_timeout_s: float = 600.0
    nproc: int = 2
    extra_overrides: list[str] = field(default_factory=list)


@dataclass
class Kill:
    attempt: int
    aimed: str
    delay_s: float
    landed: dict[str, str]
    last_logged_step: int | None
    ckpt_tmp: list[str]
    t: float


@dataclass
class SoakResult:
    kills: list[Kill]
    attempts: int
    wall_s: float
    reference_wall_s: float
    steps: int
    replayed_lines: int
    compared_lines: int
    landed_counts: dict[str, int]
    final_step: int

    def summary(self) -> str:
        return (f"{len(self.kills)} SIGKILLs over {self.attempts} attempts in {self.wall_s:.0f}s "
                f"(reference {self.reference_wall_s:.0f}s); landed (rank 0): {dict(self.landed_counts)}; "
                f"{self.compared_lines} metric lines compared ({self.replayed_lines} replays) bitwise equal; "
                f"final checkpoint step {self.final_step}: model + optimizer torch.equal")


class SoakFailure(AssertionError):
    pass


# ---- setup --------------------------------------------------------------------------------------

def make_data(data_dir: Path, seed: int = 0, vocab: int = 512, train_shards: int = 3,
              shard_tokens: int = 6000, val_tokens: int = 9000) -> None:
    """Tiny llm.c shards (tokens < ``vocab``) with ``data_pipeline.shards.write_shard``. The tokens
    follow a noisy periodic pattern so the tiny model's loss actually moves."""
    from data_pipeline.shards import write_shard

    g = np.random.default_rng(seed)
    data_dir.mkdir(parents=True, exist_ok=True)

    def tokens(n: int) -> np.ndarray:
        base = (np.arange(n) * 7 + g.integers(0, 3, n)) % 97
        noise = g.integers(0, vocab, n)
        return np.where(g.random(n) < 0.2, noise, base).astype(np.uint16)

    write_shard(data_dir / "val_000000.bin", tokens(val_tokens))
    for i in range(train_shards):
        write_shard(data_dir / f"train_{i:06d}.bin", tokens(shard_tokens))


def write_config(cfg: SoakConfig, data_dir: Path, run_dir: Path, path: Path) -> None:
    conf = {
        "model": {"preset": "tiny-vocab"},
        "data": {"dir": str(data_dir), "seq_len": cfg.seq_len, "shuffle": True, "seed": 0},
        "optim": {"lr": 3e-3, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"warmup_steps": 2, "max_steps": cfg.max_steps, "min_lr_ratio": 0.1},
        "train": {"run_dir": str(run_dir), "global_batch_tokens": cfg.global_batch_seqs * cfg.seq_len,
                  "micro_batch_size": cfg.micro_batch_size, "seed": 1337, "device": "cpu",
                  "compile": False, "dtype": "fp32", "log_interval": 1},
        "eval": {"interval": cfg.eval_interval, "val_tokens": cfg.val_tokens, "hellaswag": False,
                 "sample_prompt": ""},
        "checkpoint": {"interval": cfg.checkpoint_interval, "keep_last": cfg.keep_last,
                       "async_save": cfg.async_save, "resume": "auto"},
        "logging": {"wandb": "disabled"},
        "distributed": {"mode": "ddp", "backend": "gloo", "timeout_s": 60},
    }
    path.write_text(yaml.safe_dump(conf, sort_keys=False))


def _cmd(cfg: SoakConfig, config_path: Path) -> list[str]:
    return procs.torchrun_cmd(ENTRY, "--config", str(config_path), "--resume", "auto",
                              *cfg.extra_overrides, nproc=cfg.nproc)


def _env(cfg: SoakConfig, phase_dir: Path | None) -> dict[str, str]:
    extra = {"CHAOS_SLOW_IO": str(cfg.slow_io_s)}
    if phase_dir is not None:
        extra["CHAOS_PHASE_DIR"] = str(phase_dir)
    if cfg.step_sleep_s:  # train_entry.py installs it (tests/faults.py)
        extra[faults.FAULT_ENV] = f"sleep:{cfg.step_sleep_s}"
    return procs.child_env(**extra)


# ---- observing a run ----------------------------------------------------------------------------

def read_phase(phase_dir: Path, rank: int) -> tuple[int, str, int] | None:
    try:
        seq, phase, step, _t = (phase_dir / f"rank{rank}").read_text().split()
        return int(seq), phase, int(step)
    except (OSError, ValueError):
        return None


def _where(phase: tuple[int, str, int] | None) -> str:
    """``phase`` or ``phase@step`` (checkpoint saves know their step)."""
    if phase is None:
        return "?"
    return phase[1] if phase[2] < 0 else f"{phase[1]}@{phase[2]}"


def read_metrics(run_dir: Path) -> tuple[list[dict], int]:
    """(records, torn lines) of ``metrics.jsonl`` (``run_dir`` may also be the file itself)."""
    path = run_dir if run_dir.suffix == ".jsonl" else run_dir / "metrics.jsonl"
    if not path.exists():
        return [], 0
    recs, torn = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    return recs, torn


def last_logged_step(run_dir: Path) -> int | None:
    recs, _ = read_metrics(run_dir)
    steps = [r["step"] for r in recs if "step" in r]
    return steps[-1] if steps else None


def _tmp_dirs(run_dir: Path) -> list[str]:
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted(f"{p.name}:{sorted(q.name for q in p.iterdir()) if p.is_dir() else ''}"
                  for p in ck.iterdir() if p.name.endswith(".tmp"))


# ---- running ------------------------------------------------------------------------------------

TEARDOWN_ABORT = "terminate called without an active exception"
teardown_aborts: list[str] = []


def _finished_but_aborted_at_exit(log_path: Path, max_steps: int) -> bool:
    """The run logged ``done: N steps`` (every step trained, last checkpoint saved) and a rank then
    died in C++ while tearing down the gloo process group -- a known exit-time race outside what
    the soak tests (nothing is lost by it); recorded, printed and reported, not a soak failure."""
    text = log_path.read_text(errors="replace")
    if f"done: {max_steps} steps" in text and TEARDOWN_ABORT in text:
        teardown_aborts.append(str(log_path))
        print(f"WARNING: {log_path}: the run finished, then a rank aborted in process-group teardown "
              f"({TEARDOWN_ABORT!r}); torchrun reported failure for a finished run")
        return True
    return False


def run_reference(cfg: SoakConfig, config_path: Path, log_path: Path) -> float:
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        p = subprocess.Popen(_cmd(cfg, config_path), cwd=procs.REPO, env=_env(cfg, None), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=cfg.attempt_timeout_s)
        except subprocess.TimeoutExpired:
            procs.kill_tree(p.pid)
            raise SoakFailure(f"reference run did not finish in {cfg.attempt_timeout_s}s; see {log_path}") from None
    if rc != 0 and not _finished_but_aborted_at_exit(log_path, cfg.max_steps):
        raise SoakFailure(f"reference run exited {rc}; see {log_path}:\n{_tail(log_path)}")
    return time.monotonic() - t0


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_with_kills(cfg: SoakConfig, config_path: Path, run_dir: Path, phase_dir: Path,
                   log, say=print) -> tuple[list[Kill], int, float]:
    rng = random.Random(cfg.seed)
    phases = list(PHASE_WEIGHT)
    weights = [PHASE_WEIGHT[p] for p in phases]
    kills: list[Kill] = []
    attempt = 0
    t_begin = time.monotonic()
    while True:
        attempt += 1
        killing = len(kills) < cfg.kills and (cfg.minutes is None or time.monotonic() - t_begin < 60 * cfg.minutes)
        aimed = rng.choices(phases, weights)[0] if killing else None
        if killing and len(kills) < len(cfg.aim):
            aimed = cfg.aim[len(kills)]
        if aimed == "load" and not any((run_dir / "checkpoints").glob("step_*")):
            aimed = "train"  # nothing to resume from yet
        nth = rng.randint(1, 2) if aimed in ("eval", "checkpoint") else 1
        delay = rng.uniform(0, PHASE_DELAY[aimed]) if aimed else 0.0
        plan = {"event": "attempt", "attempt": attempt, "aimed": aimed, "nth": nth, "delay_s": round(delay, 4)}
        log.write(json.dumps(plan) + "\n")
        log.flush()
        shutil.rmtree(phase_dir, ignore_errors=True)
        phase_dir.mkdir(parents=True)
        out = open(run_dir.parent / f"attempt_{attempt:03d}.log", "w")
        p = subprocess.Popen(_cmd(cfg, config_path), cwd=procs.REPO, env=_env(cfg, phase_dir), stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
        t_start = time.monotonic()
        seen, last_seq, fire_at = 0, 0, None
        try:
            while p.poll() is None:
                if time.monotonic() - t_start > cfg.attempt_timeout_s:
                    procs.kill_tree(p.pid)
                    raise SoakFailure(f"attempt {attempt} ran over {cfg.attempt_timeout_s}s (a hang?); "
                                      f"see {out.name}:\n{_tail(Path(out.name))}")
                if aimed is not None:
                    now = read_phase(phase_dir, 0)
                    if fire_at is None and now is not None and now[0] != last_seq:
                        last_seq = now[0]
                        if now[1] == aimed:
                            seen += 1
                            if seen >= nth:
                                fire_at = time.monotonic() + delay
                    if fire_at is not None and time.monotonic() >= fire_at:
                        landed = {f"rank{r}": _where(read_phase(phase_dir, r)) for r in range(cfg.nproc)}
                        tmp = _tmp_dirs(run_dir)
                        procs.kill_tree(p.pid)
                        p.wait()
                        # The next start truncates metrics.jsonl to its checkpoint (replayed steps
                        # are logged afresh), so keep what this attempt logged for the comparison.
                        if (run_dir / "metrics.jsonl").exists():
                            shutil.copy(run_dir / "metrics.jsonl", run_dir.parent / f"metrics_attempt_{attempt:03d}.jsonl")
                        k = Kill(attempt, aimed, round(delay, 4), landed, last_logged_step(run_dir), tmp,
                                 round(time.monotonic() - t_begin, 2))
                        kills.append(k)
                        log.write(json.dumps({"event": "kill", **asdict(k)}) + "\n")
                        log.flush()
                        say(f"kill {len(kills)}: aimed {aimed}, landed {landed}, last step {k.last_logged_step}"
                            + (f", tmp {tmp}" if tmp else ""))
                        break
                time.sleep(0.002)
        finally:
            out.close()
            if p.poll() is None:
                procs.kill_tree(p.pid)
        rc = p.returncode
        if fire_at is not None and kills and kills[-1].attempt == attempt:
            continue
        if rc != 0 and not _finished_but_aborted_at_exit(Path(out.name), cfg.max_steps):
            raise SoakFailure(f"attempt {attempt} exited {rc} without being killed; see {out.name}:\n"
                              f"{_tail(Path(out.name))}")
        log.write(json.dumps({"event": "finished", "attempt": attempt}) + "\n")
        return kills, attempt, time.monotonic() - t_begin


# ---- comparing ----------------------------------------------------------------------------------

def _bits_equal(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def _tensors_equal(a, b, where: str, problems: list[str]) -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype \
                or a.shape != b.shape or not torch.equal(a, b):
            problems.append(f"{where}: tensors differ")
        return
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            problems.append(f"{where}: keys differ {sorted(set(a) ^ set(b), key=str)[:5]}")
        for k in set(a) & set(b):
            _tensors_equal(a[k], b[k], f"{where}.{k}", problems)
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            problems.append(f"{where}: lengths differ")
        for i, (x, y) in enumerate(zip(a, b)):
            _tensors_equal(x, y, f"{where}[{i}]", problems)
        return
    if not _bits_equal(a, b):
        problems.append(f"{where}: {a!r} != {b!r}")


def compare_runs(ref_dir: Path, run_dir: Path) -> tuple[int, int, int]:
    """Raise SoakFailure unless ``run_dir`` matches ``ref_dir`` bitwise (see the module doc).
    Returns (compared lines, replayed lines, final step)."""
    from pretrain.checkpoint import Checkpointer, load_model_state

    problems: list[str] = []
    ref_recs, ref_torn = read_metrics(ref_dir)
    # Every line any attempt logged: the snapshots taken at each kill, then the final file.
    recs, torn = [], 0
    for f in [*sorted(run_dir.parent.glob("metrics_attempt_*.jsonl")), run_dir / "metrics.jsonl"]:
        r, t = read_metrics(f)
        recs += r
        torn += t
    if ref_torn or torn:
        problems.append(f"torn metrics.jsonl lines: reference {ref_torn}, chaos run {torn}")
    ref = {}
    for r in ref_recs:
        if "step" in r and "loss" in r:
            if r["step"] in ref:
                problems.append(f"reference logged step {r['step']} twice")
            ref[r["step"]] = r
    if not ref:
        raise SoakFailure(f"{ref_dir / 'metrics.jsonl'}: no step lines")
    # One execution of a step is one distinct line (each carries its wall-clock "time"); the
    # same line in a kill snapshot and in the final file is one execution, kept by truncation.
    executions: dict[int, set[str]] = {}
    seen: Counter = Counter()
    compared = 0
    for r in recs:
        if "step" not in r or "loss" not in r:
            continue
        s = r["step"]
        key = json.dumps(r, sort_keys=True)
        if key in executions.setdefault(s, set()):
            continue
        executions[s].add(key)
        seen[s] += 1
        if s not in ref:
            problems.append(f"chaos run logged step {s}, which the reference never logged")
            continue
        for key in COMPARED_KEYS:
            if (key in r) != (key in ref[s]) and key.startswith("val/"):
                problems.append(f"step {s}: '{key}' logged in only one of the runs")
            elif key in r and not _bits_equal(r[key], ref[s][key]):
                problems.append(f"step {s} (logged #{seen[s]}): {key} {r[key]!r} != reference {ref[s][key]!r}")
        compared += 1
    missing = sorted(set(ref) - set(seen))
    if missing:
        problems.append(f"steps never logged by the chaos run: {missing[:20]}")
    replayed = sum(c - 1 for c in seen.values())

    ref_ck, ck = Checkpointer(ref_dir / "checkpoints", 1).latest(), Checkpointer(run_dir / "checkpoints", 1).latest()
    if ref_ck is None or ck is None:
        raise SoakFailure(f"no final checkpoint: reference {ref_ck}, chaos run {ck}")
    if ref_ck.name != ck.name:
        problems.append(f"final checkpoints differ in step: {ref_ck.name} vs {ck.name}")
    ref_sd, _ = load_model_state(ref_ck)
    sd, _ = load_model_state(ck)
    _tensors_equal(ref_sd, sd, "model", problems)
    for name in ("optim.pt", "trainer_state.pt"):
        if (ref_ck / name).exists() or (ck / name).exists():
            a = torch.load(ref_ck / name, weights_only=True)
            b = torch.load(ck / name, weights_only=True)
            if name == "trainer_state.pt":  # wall-clock figures legitimately differ
                a, b = _strip_timing(a), _strip_timing(b)
            _tensors_equal(a, b, name, problems)
    leftovers = _tmp_dirs(run_dir)
    if leftovers:
        problems.append(f"leftover checkpoint temp dirs after the final save: {leftovers}")
    if problems:
        raise SoakFailure("chaos run differs from the uninterrupted reference:\n  " + "\n  ".join(problems[:40]))
    return compared, replayed, int(ck.name.split("_")[1])


_TIMING_WORDS = ("time", "wall", "elapsed", "per_s", "throughput", "mfu", "restarts", "resumes", "date")


def _strip_timing(obj):
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items()
                if not any(w in str(k).lower() for w in _TIMING_WORDS)}
    return obj


# ---- the whole soak -----------------------------------------------------------------------------

def soak(cfg: SoakConfig, say=print) -> SoakResult:
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data_dir, ref_dir, run_dir = work / "data", work / "reference", work / "chaos"
    for d in (ref_dir, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    for f in [*work.glob("metrics_attempt_*.jsonl"), *work.glob("attempt_*.log")]:
        f.unlink()
    make_data(data_dir, seed=cfg.seed)
    write_config(cfg, data_dir, ref_dir, work / "reference.yaml")
    write_config(cfg, data_dir, run_dir, work / "chaos.yaml")
    say(f"soak: seed {cfg.seed}, {cfg.max_steps} steps, checkpoint every {cfg.checkpoint_interval}, eval every "
        f"{cfg.eval_interval}, {cfg.kills} kills" + (f" / {cfg.minutes} min" if cfg.minutes else "") + f"; in {work}")
    ref_wall = run_reference(cfg, work / "reference.yaml", work / "reference.log")
    say(f"reference run: {ref_wall:.1f}s")
    with open(work / "soak_log.jsonl", "w") as log:
        log.write(json.dumps({"event": "config", **{k: str(v) for k, v in asdict(cfg).items()}}) + "\n")
        kills, attempts, wall = run_with_kills(cfg, work / "chaos.yaml", run_dir, work / "phase", log, say)
        compared, replayed, final_step = compare_runs(ref_dir, run_dir)
        landed = Counter(k.landed.get("rank0", "?").split("@")[0] for k in kills)
        res = SoakResult(kills, attempts, wall, ref_wall, cfg.max_steps, replayed, compared, dict(landed), final_step)
        log.write(json.dumps({"event": "result", "summary": res.summary()}) + "\n")
    say(res.summary())
    return res
