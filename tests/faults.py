"""Fault injection for the tests, from the tests: the product carries none of it.

Three kinds, each installed by monkeypatching the product's code in the process that runs it:

    the trainer (``install(spec)``), SPEC one of
        crash:S      rank 0 dies (``os._exit(13)``) right after step S, once per run directory
                     (a marker file remembers it, so the restarted run passes step S)
        nan:S        rank W-1's loss is NaN at step S (so are the gradients it makes), as an overflow
                     would leave them
        nan_from:S   the same at every step from S on
        sleep:SEC    every step takes SEC seconds longer (time to signal or kill a run mid-way)
    a collective (``install_hang(spec)``), SPEC ``<rank>:<what>`` (e.g. ``1:all_reduce(loss)``,
        ``*`` for any): that rank sleeps forever just before that collective (a rank that stopped
        answering)
    a prepare's shard commits (``install_prepare_sleep(seconds)``): each shard's commit takes SECONDS
        longer between the shard file and the manifest that lists it (Ctrl-C is held there) and
        SECONDS more after it (time to signal or kill a prepare mid-way)

In this process a test calls ``install(spec, monkeypatch.setattr)``. A child process (``python
pretrain/train.py``, torchrun and its workers, the launchers) gets them from its environment:
``child_env(fault=..., hang=..., prepare_sleep=...)`` puts ``tests/fault_site`` (whose
``sitecustomize.py`` calls :func:`install_from_env`) first on ``PYTHONPATH`` and the specs in
``GPT2_TEST_FAULT`` / ``GPT2_TEST_HANG`` / ``GPT2_TEST_PREPARE_SLEEP``.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

FAULT_ENV = "GPT2_TEST_FAULT"
HANG_ENV = "GPT2_TEST_HANG"
PREPARE_SLEEP_ENV = "GPT2_TEST_PREPARE_SLEEP"
SITE = Path(__file__).resolve().parent / "fault_site"


def child_env(fault: str | None = None, hang: str | None = None,
              prepare_sleep: float | None = None) -> dict[str, str]:
    """The environment entries that make a child process inject ``fault`` / ``hang`` /
    ``prepare_sleep``."""
    if fault is not None:
        _parse(fault)
    old = os.environ.get("PYTHONPATH")
    out = {"PYTHONPATH": str(SITE) + (os.pathsep + old if old else "")}
    if fault is not None:
        out[FAULT_ENV] = fault
    if hang is not None:
        out[HANG_ENV] = hang
    if prepare_sleep is not None:
        if not prepare_sleep > 0:
            raise ValueError(f"prepare_sleep must be > 0 seconds, got {prepare_sleep!r}")
        out[PREPARE_SLEEP_ENV] = str(prepare_sleep)
    return out


def install_from_env() -> None:
    if os.environ.get(FAULT_ENV):
        install(os.environ[FAULT_ENV])
    if os.environ.get(HANG_ENV):
        install_hang(os.environ[HANG_ENV])
    if os.environ.get(PREPARE_SLEEP_ENV):
        install_prepare_sleep(float(os.environ[PREPARE_SLEEP_ENV]))


def _parse(spec: str) -> tuple[str, float]:
    if not re.fullmatch(r"(crash|nan|nan_from):\d+|sleep:[0-9.]+", spec):
        raise ValueError(f"fault {spec!r} must be crash:STEP, nan:STEP, nan_from:STEP or sleep:SECONDS")
    kind, _, value = spec.partition(":")
    return kind, float(value)


def install(spec: str, patch=setattr) -> None:
    """Wrap ``Trainer.train_step`` (nan) or ``Trainer._record`` (crash, sleep: right after a
    step is counted and recorded) with the fault ``spec``."""
    from pretrain.training.trainer import Trainer

    kind, value = _parse(spec)
    if kind in ("nan", "nan_from"):
        real_step = Trainer.train_step

        def train_step(self):
            at = int(value)
            due = self.step == at or (kind == "nan_from" and self.step >= at)
            if not due or self.info.rank != self.info.world_size - 1:
                return real_step(self)
            # the model's loss is NaN for this step's micro-steps (a forward hook, so DDP / FSDP wrapping stays)
            handle = self.model.register_forward_hook(lambda module, args, out: (out[0], out[1] * float("nan")))
            try:
                return real_step(self)
            finally:
                handle.remove()

        patch(Trainer, "train_step", train_step)
        return
    real_record = Trainer._record

    def _record(self, r, dt):
        record = real_record(self, r, dt)
        if kind == "sleep":
            time.sleep(value)
        elif self.step == int(value) and self.info.rank == 0:
            marker = self.plan.run_dir / f".fault_injected_crash_{int(value)}"
            if not marker.exists():
                marker.write_text("crashed once here\n")
                print(f"[rank 0] fault injection: crashing after step {self.step}", file=sys.stderr, flush=True)
                os._exit(13)
        return record

    patch(Trainer, "_record", _record)


def install_hang(spec: str, patch=setattr) -> None:
    """Wrap ``pretrain.dist.collective``: rank R sleeps forever before the collective named ``what``."""
    import torch.distributed as tdist

    from pretrain import dist

    real = dist.collective
    rank_s, _, op = spec.partition(":")

    def collective(what: str, group=None):
        if dist.group_up() and rank_s.strip() == str(tdist.get_rank()) and op.strip() in (what, "*"):
            print(f"[fault injection] rank {tdist.get_rank()} hangs before {what} ({HANG_ENV}={spec})", flush=True)
            while True:  # a rank that stopped answering
                time.sleep(3600)
        return real(what, group)

    patch(dist, "collective", collective)


def install_prepare_sleep(seconds: float, patch=setattr) -> None:
    """Wrap ``data_pipeline.job``'s ``write_shard`` (called inside a shard's commit, where Ctrl-C is
    held, before the manifest lists the shard) and ``ShardWriter._emit`` (the whole commit) to sleep
    ``seconds`` after each: a kill lands between a shard and its listing, or between commits."""
    from data_pipeline import job

    real_write, real_emit = job.write_shard, job.ShardWriter._emit

    def write_shard(*args, **kwargs):
        digest = real_write(*args, **kwargs)
        time.sleep(seconds)
        return digest

    def _emit(self, *args, **kwargs):
        real_emit(self, *args, **kwargs)
        time.sleep(seconds)

    patch(job, "write_shard", write_shard)
    patch(job.ShardWriter, "_emit", _emit)
