"""The training loop: a ``Trainer`` over parts built elsewhere, with one step counter (optimizer steps).

::

    Trainer(plan, parts)   the run plan (pretrain/plan.py) and the parts build.py made from it:
                           the wrapped model, optimizer, loader, checkpointer, logger, evaluators
    train()        until schedule.max_steps:
                     train_step()   the step's micro-steps (gradients reduced on the last one),
                                    clip, one all-reduce of [loss, non-finite, stop] so every rank
                                    agrees, then the optimizer step (or a skip)
                     evaluate()     every eval.interval steps and at the end: the evaluators
                     save()         every checkpoint.interval steps, at the end, on a stop

Preemption and Ctrl-C (``signals.py``): a signal sets a flag; the step's all-reduce makes every
rank see it at the same step; they finish that step, save it, and ``train()`` returns 75 or 130.
A non-finite loss or gradient norm on any rank skips the optimizer step on every rank;
``train.max_nonfinite_in_a_row`` in a row raise ``NonFiniteError``.

``self.step`` counts optimizer steps taken (or skipped): step s (0-based) uses ``plan.lr_at(s)``;
after it ``self.step == s + 1``, and a checkpoint labelled N holds the state after N steps.

Evaluators (``parts.evaluators``, from evals/): ``name`` and ``__call__(model, step) -> dict``, run
on every rank together.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pretrain import dist
from pretrain.training.metrics import memory_gb, mfu
from pretrain.training.optim import clip_grad_norm, set_lr
from pretrain.training.signals import EXIT_OK, StopRequest

if TYPE_CHECKING:
    from pretrain.plan import RunPlan


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: the run diverged."""


@dataclasses.dataclass
class StepResult:
    loss: float | None
    grad_norm: float | None
    lr: float
    skipped: bool
    stop: bool
    spike: bool = False


class Trainer:
    def __init__(self, plan: RunPlan, parts) -> None:
        self.plan, self.cfg = plan, plan.cfg
        self.info, self.device = parts.info, parts.info.device
        self.wrapped, self.model = parts.wrapped, parts.wrapped.module
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.loader, self.checkpointer = parts.optimizer, parts.loader, parts.checkpointer
        self.logger, self.evaluators = parts.logger, list(parts.evaluators)
        self.spike, self.flops_token, self.peak = parts.spike, parts.flops_token, parts.peak
        self.n_params = self.model.num_params()
        self.step = self.tokens_seen = self.nonfinite_total = self.nonfinite_in_a_row = 0
        self.stop = StopRequest(self.info.rank, lambda: self.step + 1)
        if parts.resumed is not None:
            self.load_state_dict(parts.resumed)


    def state_dict(self) -> dict[str, Any]:
        """Global trainer state (identical on every rank)."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loader": self.loader.state_dict(),
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "world_size": self.info.world_size,
            "derived": dataclasses.asdict(self.plan.batch),
            "spike": self.spike.state_dict() if self.spike is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.loader.load_state_dict(state["loader"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        if self.spike is not None and state.get("spike"):
            self.spike.load_state_dict(state["spike"])

    def save(self) -> Path:
        from pretrain.checkpoint import capture_rng_state

        t0 = time.perf_counter()
        path = self.checkpointer.save(self.step, self.model, self.optimizer, self.state_dict(),
                                      {"rng": capture_rng_state()}, self.cfg.to_dict(), fsdp=self.wrapped.fsdp)
        self.logger.print(f"checkpoint step {self.step} -> {path} ({time.perf_counter() - t0:.2f}s)")
        return path


    def train_step(self) -> StepResult:
        """One optimizer step: its micro-steps, clip, agree across ranks, step (or skip)."""
        model = self.wrapped.train_model
        accum, lr = self.plan.batch.accum_at(self.step), self.plan.lr_at(self.step)
        set_lr(self.optimizer, lr)
        loss_accum = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self.loader.next_batch()  # (B, T) each
            with self.wrapped.sync_context(last_micro_step=micro == accum - 1):
                # The forward holds collectives too (DDP's one-time bucket rebuild broadcast,
                # FSDP's parameter all-gathers): a rank that stopped answering fails it in one line.
                with self.wrapped.autocast(), dist.collective("broadcast / all-gather in the forward (DDP buckets, FSDP)"):
                    _, loss = model(x, y)
                # Equal-sized micro-batches: the mean of means is the mean over every token of
                # the global batch (DDP / FSDP average over ranks).
                loss = loss / accum
                loss_accum += loss.detach()
                # The last micro-step's backward carries DDP's / FSDP's gradient reduction.
                with dist.collective("gradient reduction (backward)"):
                    loss.backward()
        with dist.collective("gradient norm (clip_grad_norm)"):
            grad_norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip)

        # One collective for everything the ranks must agree on: [sum of losses, any non-finite, any stop],
        # and the step's one host sync: those three and the (already global) grad norm in one tolist().
        bad = (~torch.isfinite(loss_accum)) | (~torch.isfinite(grad_norm))
        flags = torch.stack([
            loss_accum.float(), bad.float(),
            torch.full((), 1.0 if self.stop.requested else 0.0, device=self.device),  # a fill, not a copy
        ])
        dist.all_reduce(flags, "step flags: loss, non-finite, stop")
        loss_sum, n_bad, n_stop, gn = torch.cat([flags, grad_norm.detach().float().reshape(1)]).tolist()
        skipped = n_bad > 0
        loss_mean = loss_sum / self.info.world_size
        # Fed the all-reduced loss and the (already global) grad norm, the detector takes the same
        # decision on every rank; it all-reduces the decision too.
        spike = not skipped and self.spike is not None and self.spike.update(loss_mean, gn)
        if skipped:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
        else:
            if not spike:  # a spike: no update from this batch; its step and data still count
                self.optimizer.step()
            self.nonfinite_in_a_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens_seen += self.plan.batch.tokens_at(self.step)
        self.step += 1
        return StepResult(loss=loss_mean if np.isfinite(loss_mean) else None,
                          grad_norm=gn if np.isfinite(gn) else None, lr=lr, skipped=skipped, stop=n_stop > 0,
                          spike=spike)


    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Run every evaluator (all ranks together) with the model in eval mode, under ``fork_rng``
        so evaluation never shifts the training RNG streams."""
        model = self.wrapped.eval_model
        results: dict[str, Any] = {}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            model.eval()
            try:
                for ev in self.evaluators:
                    t0 = time.perf_counter()
                    # The evaluators' own reductions name themselves; the collectives inside the forward
                    # (FSDP's all-gathers) are named here. An interruptible evaluator polls the stop flag
                    # between batches (a Ctrl-C during a long evaluation saves within seconds).
                    kw = {"stop": lambda: self.stop.requested} if getattr(ev, "interruptible", False) else {}
                    with dist.collective(f"{ev.name} eval (all-gathers in the forward)"):
                        results.update(ev(model, self.step, **kw))  # evaluators pick their own precision
                    results[f"time/{ev.name}_s"] = round(time.perf_counter() - t0, 3)
            finally:
                model.train()
        return results

    def _due(self, interval: int) -> bool:
        return interval > 0 and self.step % interval == 0

    def _record(self, r: StepResult, dt: float) -> dict[str, Any]:
        """The metrics of the step just taken."""
        tps = self.plan.batch.tokens_at(self.step - 1) / dt
        record: dict[str, Any] = {
            "step": self.step, "tokens_seen": self.tokens_seen, "loss": r.loss, "lr": r.lr,
            "grad_norm": r.grad_norm, "tokens_per_s": tps,
            "mfu": mfu(tps, self.flops_token, self.peak, self.info.world_size),
            "time": time.time(), "dt_ms": 1000 * dt, "mem_gb": memory_gb(self.device),
        }
        if r.skipped:
            record.update(skipped=True, nonfinite_in_a_row=self.nonfinite_in_a_row,
                          nonfinite_total=self.nonfinite_total)
        if r.spike:
            record.update(spike_skipped=True, spike_reason=self.spike.last_reason, spike_total=self.spike.skipped)
        return record

    def train(self) -> int:
        """Train to schedule.max_steps; returns the process exit code (0, 75 after preemption, 130
        after Ctrl-C)."""
        cfg = self.cfg
        max_steps, limit = cfg.schedule.max_steps, cfg.train.max_nonfinite_in_a_row
        self.stop.install()
        try:
            while self.step < max_steps:
                t0 = time.perf_counter()
                r = self.train_step()
                record = self._record(r, time.perf_counter() - t0)
                last = self.step == max_steps
                if self.nonfinite_in_a_row >= limit:
                    self.logger.log(record)
                    first = self.step - self.nonfinite_in_a_row + 1  # skipped steps leave the weights as they were
                    raise NonFiniteError(
                        f"{self.nonfinite_in_a_row} steps in a row with a non-finite loss or gradient norm "
                        f"(train.max_nonfinite_in_a_row={limit}), steps {first}-{self.step}; they changed no weight, "
                        f"so every checkpoint in {self.plan.ckpt_dir} holds the weights of before step {first}: "
                        "resume (--resume auto) with a lower optim.lr")
                evaluated = bool(self.evaluators) and (self._due(cfg.eval.interval) or (last and cfg.eval.interval > 0))
                stop = r.stop
                if evaluated:
                    record.update(self.evaluate())
                    stop = stop or self.stop.agreed("stop after eval")  # a signal during the evaluation
                if self._due(cfg.train.log_interval) or last or r.skipped or r.spike or evaluated:
                    self.logger.log(record)
                if self._due(cfg.checkpoint.interval) or last or stop:
                    self.save()
                if stop:
                    self.checkpointer.wait()
                    code = self.stop.code
                    self.logger.print(f"preempted ({self.stop.signal or 'signal on another rank'}): "
                                      f"checkpoint at step {self.step}; exiting {code}")
                    return code
            self.checkpointer.wait()
            self.logger.print(f"done: {self.step} steps, {self.tokens_seen:,} tokens")
            return EXIT_OK
        finally:
            self.stop.restore()
            self.logger.close()

    def close(self, clean: bool = True) -> None:
        dist.teardown(clean)
