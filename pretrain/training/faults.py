"""Fault injection for the tests (``train.fault_inject``), as a trainer hook: the production
loop carries none of it. ``pretrain/training/build.py`` adds a :class:`FaultInjector` to the
trainer's hooks when the key is set; the chaos tests, the launcher tests and the run-dir soak
reach the trainer's code points through it:

    crash:S      rank 0 dies (``os._exit(13)``) right after step S, once per run directory
                 (a marker file remembers it, so the restarted run passes step S)
    nan:S        rank W-1's gradient and loss are NaN at step S (as an overflow would leave them)
    nan_from:S   the same at every step from S on
    sleep:SEC    every step takes SEC seconds longer (time to signal or kill a run mid-way)

The trainer's hook points (``Trainer.hooks``): ``after_backward(trainer, loss) -> loss`` before
the step's all-reduce, and ``after_step(trainer)`` once the step is counted.
"""

from __future__ import annotations

import os
import sys
import time

import torch


class FaultInjector:
    def __init__(self, spec: str) -> None:
        kind, _, value = spec.partition(":")
        self.kind, self.value = kind, float(value)

    def after_backward(self, trainer, loss: torch.Tensor) -> torch.Tensor:
        if self.kind not in ("nan", "nan_from") or trainer.info.rank != trainer.info.world_size - 1:
            return loss
        at = int(self.value)
        if trainer.step == at or (self.kind == "nan_from" and trainer.step >= at):
            for p in trainer.params:  # a poisoned gradient, as an overflow would leave it
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
                    break
            return loss * float("nan")
        return loss

    def after_step(self, trainer) -> None:
        if self.kind == "sleep":
            time.sleep(self.value)
        elif self.kind == "crash" and trainer.step == int(self.value) and trainer.info.rank == 0:
            marker = trainer.plan.run_dir / f".fault_injected_crash_{int(self.value)}"
            if not marker.exists():
                marker.write_text("crashed once here\n")
                print(f"[rank 0] fault injection: crashing after step {trainer.step}", file=sys.stderr, flush=True)
                os._exit(13)
