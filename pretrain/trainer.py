"""The training loop: a ``Trainer`` with small methods and one step counter (optimizer steps).

::

    build()        process group, model (seeded), wrap (parallel.py), AdamW, loader, checkpointer,
                   resume (auto | none | PATH), metrics logger
    train()        until schedule.max_steps:
                     train_step()   grad_accum micro-steps (gradients reduced on the last one),
                                    clip, one all-reduce of [loss, non-finite, stop] so every rank
                                    agrees, then the optimizer step (or a skip)
                     evaluate()     every eval.interval steps: the evaluators + a sample
                     save()         every checkpoint.interval steps, at the end, on preemption

Preemption: SIGTERM / SIGUSR1 set a flag; the step's all-reduce makes every rank see it at
the same step; they finish that step, save it, and ``train()`` returns ``EXIT_PREEMPTED``
(75, EX_TEMPFAIL) for launchers to requeue on. Ctrl-C (SIGINT) does the same and returns
``EXIT_INTERRUPTED`` (130); a second Ctrl-C raises ``KeyboardInterrupt`` at once.
A non-finite loss or gradient norm on any rank skips the optimizer step on every rank; ``train.max_nonfinite_in_a_row`` in a row raise
``NonFiniteError`` (the newest checkpoint, made before the trouble, is kept).

``self.step`` counts optimizer steps taken (or skipped): step s (0-based) uses ``lr_at(s)``;
after it ``self.step == s + 1``, and a checkpoint labelled N holds the state after N steps.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pretrain import dist
from pretrain.config import Config, ConfigError, Derived, validate
from pretrain.guards import LossSpikeDetector, collective
from pretrain.host_memory import keep_freed_memory
from pretrain.metrics import MetricsLogger, flops_per_token, memory_gb, mfu, peak_flops, startup_summary
from pretrain.model import GPT
from pretrain.optim import batch_tokens_at, build_optimizer, clip_grad_norm, lr_at, set_lr
from pretrain.parallel import Wrapped, wrap_model
from pretrain.rundir import move_run_aside, previous_run_entries

EXIT_OK = 0
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): "try again later" -- a requeue-able stop
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")
INTERRUPT_SIGNALS = ("SIGINT",)  # Ctrl-C: the same graceful stop, exit 130; a second one aborts at once
# A terminal's Ctrl-C reaches a torchrun worker twice within milliseconds (from the tty, and
# forwarded by torchrun): only a repeat this much later is a person's second Ctrl-C.
INTERRUPT_REPEAT_S = 1.0


class Evaluator(Protocol):
    name: str

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]: ...


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


def has_checkpoints(ckpt_dir: Path) -> bool:
    return ckpt_dir.is_dir() and any(re.match(r"^step_\d{8}", p.name) for p in ckpt_dir.iterdir())


class Trainer:
    def __init__(self, cfg: Config, evaluators: list[Evaluator] | None = None):
        self.cfg = cfg
        self.evaluators: list[Evaluator] = list(evaluators or [])
        self.run_dir = Path(cfg.train.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.tokens_seen = 0
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        t = cfg.train
        self.spike: LossSpikeDetector | None = (
            LossSpikeDetector(window=t.spike_window, threshold=t.spike_threshold) if t.spike_detection else None)
        self.resumed_from: Path | None = None
        self._stop_signal: str | None = None
        self._stop_time = 0.0
        self._last_saved_step: int | None = None
        self._prev_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ build

    def check_resume_target(self) -> None:
        """Before any work: a fresh start (resume=none) never silently reuses a run's checkpoints."""
        c = self.cfg.checkpoint
        if c.resume == "none" and has_checkpoints(self.ckpt_dir) and not c.overwrite:
            raise ConfigError(
                f"{self.ckpt_dir} already holds checkpoints and checkpoint.resume=none; continue with "
                f"--resume auto, pick another train.run_dir, or pass checkpoint.overwrite=true to move them aside"
            )
        if c.resume not in ("auto", "none") and not Path(c.resume).exists():
            raise ConfigError(f"checkpoint.resume={c.resume!r}: no such checkpoint; pass auto, none or an existing path")

    def build(self) -> Trainer:
        cfg = self.cfg
        self.check_resume_target()
        if cfg.train.reuse_host_memory:
            keep_freed_memory()  # before the model and the first step allocate
        self.info = dist.setup(cfg.train.device, cfg.distributed.backend, cfg.distributed.timeout_s,
                               need_group=cfg.distributed.mode == "fsdp")
        self.device = self.info.device
        self.derived: Derived = validate(cfg, self.info.world_size)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.set_float32_matmul_precision("high")

        # The same initial weights on every rank: seed, build, then give each rank its own stream.
        gpt_cfg = cfg.gpt_config
        torch.manual_seed(cfg.train.seed)
        model = GPT(gpt_cfg)
        self.init_note = self.init_weights_from(model)
        self.n_params = model.num_params()
        self.flops_token = flops_per_token(model.num_params(exclude_embeddings=True), gpt_cfg.n_layer,
                                           gpt_cfg.n_head, gpt_cfg.n_embd // gpt_cfg.n_head, cfg.data.seq_len)
        self.seed_rank_rngs()
        model.to(self.device)
        self.wrapped: Wrapped = wrap_model(
            model, cfg.distributed.mode, self.device, self.info.distributed, compile=cfg.train.compile,
            dtype=cfg.train.dtype, activation_checkpointing=cfg.train.activation_checkpointing,
        )
        self.model = self.wrapped.module
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        muon = dict(lr=o.muon_lr, momentum=o.muon_momentum, nesterov=o.muon_nesterov, ns_steps=o.muon_ns_steps,
                    weight_decay=o.muon_weight_decay, adjust_lr_fn=o.muon_adjust_lr,
                    ns_dtype={"bf16": "bfloat16", "fp32": "float32"}[o.muon_ns_dtype])
        self.optimizer = build_optimizer(self.model, o.lr, o.betas, o.eps, o.weight_decay, o.fused, self.device,
                                         name=o.name, muon=muon)

        from data_pipeline.loader import DistributedTokenLoader

        # With a batch-size warmup every step's batch is a multiple of the first one, so the loader's
        # unit (and its step-boundary check on resume) is that first batch (Derived.loader_batch_seqs).
        self.loader = DistributedTokenLoader(
            cfg.data.dir, "train", cfg.data.seq_len, cfg.train.micro_batch_size, self.derived.loader_batch_seqs,
            rank=self.info.rank, world_size=self.info.world_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle,
            device=self.device, vocab_size=gpt_cfg.vocab_size,  # ids >= vocab_size are refused at the data
        )
        from pretrain.checkpoint import Checkpointer

        self.checkpointer = Checkpointer(self.ckpt_dir, cfg.checkpoint.keep_last, self.info.rank,
                                         self.info.world_size, async_save=cfg.checkpoint.async_save)
        self.resume()
        self.logger = MetricsLogger(
            self.run_dir, enabled=self.info.is_main, wandb_mode=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project, wandb_name=cfg.logging.wandb_name,
            config=cfg.to_dict(), resume_step=self.step if self.resumed_from else None,
            tensorboard=cfg.logging.tensorboard, resume_tokens=self.tokens_seen if self.resumed_from else None,
        )
        if self.info.is_main:
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        self.peak = peak_flops(self.device, cfg.train.dtype)
        self.logger.print("resolved config:\n" + cfg.to_yaml().rstrip())
        self.logger.print(startup_summary(
            world_size=self.info.world_size, mode=self.wrapped.mode, device=self.device, n_params=self.n_params,
            tokens_per_step=self.derived.tokens_per_step, micro_batch=cfg.train.micro_batch_size,
            seq_len=cfg.data.seq_len, accum=self.derived.grad_accum_steps, max_steps=cfg.schedule.max_steps,
            start_step=self.step, flops_token=self.flops_token, peak=self.peak, dtype=cfg.train.dtype,
            compile=cfg.train.compile,
        ))
        if self.resumed_from:
            self.logger.print(f"resumed from {self.resumed_from} at step {self.step} "
                              f"({self.tokens_seen:,} tokens seen)")
        if self.init_note:
            self.logger.print(self.init_note)
        return self

    def init_weights_from(self, model: GPT) -> str | None:
        """``model.init_from`` into the plain model (before wrapping), unless a checkpoint will be
        resumed: then the checkpoint wins. Returns the line to log, or None."""
        spec = self.cfg.model.init_from
        if spec is None:
            return None
        found = self.resume_path()
        if found is not None:
            return f"model.init_from={spec} ignored: resuming checkpoint {found} (the checkpoint wins)"
        from pretrain.init_from import init_from

        return init_from(model, spec, model.config)

    def seed_rank_rngs(self) -> None:
        """Per-rank Python / NumPy / torch RNG streams (dropout, sampling), from train.seed and the rank."""
        s = self.cfg.train.seed + 1000 * self.info.rank
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)

    # ------------------------------------------------------------------ checkpoints

    def resume_path(self) -> Path | None:
        """The checkpoint this run resumes from: the newest complete one in the run directory
        (checkpoint.resume=auto; None if there is none), None (none), or the given path."""
        from pretrain.checkpoint import Checkpointer

        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        return Checkpointer(self.ckpt_dir, keep_last=1).latest() if resume == "auto" else Path(resume)

    def resume(self) -> None:
        c = self.cfg.checkpoint
        if c.resume == "none" and c.overwrite and previous_run_entries(self.run_dir):
            # The whole previous run (checkpoints, metrics.jsonl, config.yaml, eval files) goes
            # into one dated folder together, so the run that was kept stays readable.
            dist.barrier("before moving the previous run aside")
            if self.info.is_main:
                aside = move_run_aside(self.run_dir)
                print(f"checkpoint.overwrite: moved the previous run in {self.run_dir} to {aside}", flush=True)
            dist.barrier("after moving the previous run aside")
        path = self.resume_path()
        if path is None:
            return
        trainer_state, rank_state = self.checkpointer.load(path, self.model, self.optimizer,
                                                           fsdp=self.wrapped.fsdp)
        self.load_state_dict(trainer_state)
        if rank_state is not None:
            from pretrain.checkpoint import restore_rng_state

            restore_rng_state(rank_state["rng"])
        else:  # a rank the saving run did not have: a fresh stream, distinct from the old ranks'
            torch.manual_seed(self.cfg.train.seed + 1000 * self.info.rank + self.step)
        self.resumed_from = path
        self._last_saved_step = self.step

    def state_dict(self) -> dict[str, Any]:
        """Global trainer state (identical on every rank)."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loader": self.loader.state_dict(),
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "world_size": self.info.world_size,
            "derived": dataclasses.asdict(self.derived),
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
        path = self.checkpointer.save(
            self.step, self.model, self.optimizer, self.state_dict(), {"rng": capture_rng_state()},
            self.cfg.to_dict(), fsdp=self.wrapped.fsdp,
        )
        self._last_saved_step = self.step
        self.logger.print(f"checkpoint step {self.step} -> {path} ({time.perf_counter() - t0:.2f}s)")
        return path

    # ------------------------------------------------------------------ one step

    def autocast(self):
        if self.cfg.train.dtype == "bf16" and not self.wrapped.uses_mp_policy:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _fault(self, kind: str) -> float | None:
        """The value of test-only fault injection ``kind`` (see train.fault_inject), or None."""
        spec = self.cfg.train.fault_inject
        if not spec or not spec.startswith(kind + ":"):
            return None
        return float(spec.split(":", 1)[1])

    def train_step(self) -> StepResult:
        """One optimizer step: grad_accum micro-steps, clip, agree across ranks, step (or skip)."""
        cfg = self.cfg
        model = self.wrapped.train_model
        s = cfg.schedule
        step_tokens = self.batch_tokens()
        accum = self.derived.grad_accum_steps * step_tokens // self.derived.tokens_per_step
        lr = lr_at(self.step, cfg.optim.lr, s.warmup_steps, s.max_steps, s.min_lr_ratio,
                   name=s.name, cooldown_frac=s.cooldown_frac, cooldown=s.cooldown)
        set_lr(self.optimizer, lr)

        loss_accum = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self.loader.next_batch()  # (B, T) each
            with self.wrapped.sync_context(last_micro_step=micro == accum - 1):
                # The forward holds collectives too (DDP's one-time bucket rebuild broadcast,
                # FSDP's parameter all-gathers): a rank that stopped answering fails it in one line.
                with self.autocast(), collective("broadcast / all-gather in the forward (DDP buckets, FSDP)"):
                    _, loss = model(x, y)
                # Equal-sized micro-batches: the mean of means is the mean over every token of
                # the global batch (DDP / FSDP average over ranks).
                loss = loss / accum
                loss_accum += loss.detach()
                # The last micro-step's backward carries DDP's / FSDP's gradient reduction.
                with collective("gradient reduction (backward)"):
                    loss.backward()
        loss_accum = self._inject_nan(loss_accum)
        with collective("gradient norm (clip_grad_norm)"):
            grad_norm = clip_grad_norm(self.params, cfg.optim.grad_clip)

        # One collective for everything the ranks must agree on: [sum of losses, any non-finite, any stop],
        # and the step's one host sync: those three and the (already global) grad norm in one tolist().
        bad = (~torch.isfinite(loss_accum)) | (~torch.isfinite(grad_norm))
        flags = torch.stack([
            loss_accum.float(), bad.float(),
            torch.full((), 1.0 if self._stop_signal else 0.0, device=self.device),  # a fill, not a copy
        ])
        dist.all_reduce(flags, "sum", what="step flags: loss, non-finite, stop")
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
        self.step += 1
        self.tokens_seen += step_tokens
        return StepResult(
            loss=loss_mean if np.isfinite(loss_mean) else None,
            grad_norm=gn if np.isfinite(gn) else None,
            lr=lr, skipped=skipped, stop=n_stop > 0, spike=spike,
        )

    def batch_tokens(self, step: int | None = None) -> int:
        """Global batch (tokens) of ``step`` (default: the next one); see schedule.batch_warmup_steps."""
        s = self.cfg.schedule
        return batch_tokens_at(self.step if step is None else step, self.cfg.train.global_batch_tokens,
                               s.batch_warmup_start_tokens, s.batch_warmup_steps)

    def _inject_nan(self, loss_accum: torch.Tensor) -> torch.Tensor:
        at, start = self._fault("nan"), self._fault("nan_from")
        last_rank = self.info.rank == self.info.world_size - 1
        if last_rank and ((at is not None and self.step == int(at)) or (start is not None and self.step >= int(start))):
            for p in self.params:  # a poisoned gradient, as an overflow would leave it
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
                    break
            return loss_accum * float("nan")
        return loss_accum

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Run every evaluator (all ranks together) and a sample, with the model in eval mode.
        Runs under ``fork_rng`` so evaluation never shifts the training RNG streams."""
        model = self.wrapped.eval_model
        results: dict[str, Any] = {}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            model.eval()
            try:
                for ev in self.evaluators:
                    t0 = time.perf_counter()
                    # The evaluators' own reductions name themselves; the collectives inside
                    # the forward (FSDP's all-gathers) are named here.
                    with collective(f"{ev.name} eval (all-gathers in the forward)"):
                        results.update(ev(model, self.step))  # evaluators pick their own precision
                    results[f"time/{ev.name}_s"] = round(time.perf_counter() - t0, 3)
                text = self.sample()
                if text is not None:
                    results["sample/text"] = text
            finally:
                model.train()
        return results

    def sample(self) -> str | None:
        e = self.cfg.eval
        if not e.sample_prompt or e.sample_tokens <= 0:
            return None
        from data_pipeline.tokenizer import get_tokenizer
        from pretrain.generate import generate

        tok = get_tokenizer()
        prompt = tok.encode(e.sample_prompt)
        vocab = self.model.config.vocab_size
        if any(t >= vocab for t in prompt) or len(prompt) >= self.model.config.block_size:
            return None  # a toy vocabulary / context cannot hold the prompt
        # Eager: sampling's growing shapes would make a compiled model recompile every token.
        with torch.compiler.set_stance("force_eager"), self.autocast():
            new = generate(self.model, [prompt], max_new_tokens=e.sample_tokens, temperature=1.0,
                           top_k=e.sample_top_k, seed=self.cfg.train.seed + self.step, eot_id=None)[0]
        return tok.decode(prompt + new)

    # ------------------------------------------------------------------ the loop

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if (name in INTERRUPT_SIGNALS and self._stop_signal in INTERRUPT_SIGNALS
                and time.monotonic() - self._stop_time > INTERRUPT_REPEAT_S):
            raise KeyboardInterrupt  # a second Ctrl-C: abort at once (the newest checkpoint stays)
        if self._stop_signal is None:
            again = " (Ctrl-C again to abort at once)" if name in INTERRUPT_SIGNALS else ""
            print(f"[rank {self.info.rank}] {name}: finishing step {self.step + 1}, then checkpoint and exit "
                  f"{self._stop_code(name)}{again}", file=sys.stderr, flush=True)
            self._stop_signal, self._stop_time = name, time.monotonic()

    @staticmethod
    def _stop_code(name: str | None) -> int:
        return EXIT_INTERRUPTED if name in INTERRUPT_SIGNALS else EXIT_PREEMPTED

    def _install_signals(self) -> None:
        for name in PREEMPT_SIGNALS + INTERRUPT_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._prev_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, h in self._prev_handlers.items():
            signal.signal(sig, h)
        self._prev_handlers.clear()

    def _maybe_crash(self) -> None:
        at = self._fault("crash")
        if at is None or self.step != int(at) or self.info.rank != 0:
            return
        marker = self.run_dir / f".fault_injected_crash_{int(at)}"
        if marker.exists():
            return
        marker.write_text("crashed once here\n")
        print(f"[rank 0] fault injection: crashing after step {self.step}", file=sys.stderr, flush=True)
        os._exit(13)

    def _due(self, interval: int) -> bool:
        return interval > 0 and self.step % interval == 0

    def train(self) -> int:
        """Train to schedule.max_steps; returns the process exit code (0, 75 after preemption, 130
        after Ctrl-C)."""
        cfg = self.cfg
        max_steps = cfg.schedule.max_steps
        sleep = self._fault("sleep")
        self._install_signals()
        try:
            while self.step < max_steps:
                t0 = time.perf_counter()
                r = self.train_step()
                dt = time.perf_counter() - t0
                if sleep:
                    time.sleep(sleep)
                self._maybe_crash()
                last = self.step == max_steps
                tps = self.batch_tokens(self.step - 1) / dt
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
                    record.update(spike_skipped=True, spike_reason=self.spike.last_reason,
                                  spike_total=self.spike.skipped)
                if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                    self.logger.log(record)
                    raise NonFiniteError(
                        f"{self.nonfinite_in_a_row} steps in a row with a non-finite loss or gradient norm "
                        f"(train.max_nonfinite_in_a_row={cfg.train.max_nonfinite_in_a_row}) at step {self.step}; "
                        f"the newest checkpoint in {self.ckpt_dir} predates them: resume with a lower optim.lr"
                    )
                evaluated = (self.evaluators or cfg.eval.sample_prompt) and (
                    self._due(cfg.eval.interval) or (last and cfg.eval.interval > 0))
                if evaluated:
                    record.update(self.evaluate())
                if self._due(cfg.train.log_interval) or last or r.skipped or r.spike or evaluated:
                    self.logger.log(record)
                if self._due(cfg.checkpoint.interval) or last or r.stop:
                    self.save()
                if r.stop:
                    self.checkpointer.wait()
                    code = self._stop_code(self._stop_signal)
                    self.logger.print(f"preempted ({self._stop_signal or 'signal on another rank'}): "
                                      f"checkpoint at step {self.step}; exiting {code}")
                    return code
            self.checkpointer.wait()
            self.logger.print(f"done: {self.step} steps, {self.tokens_seen:,} tokens")
            return EXIT_OK
        finally:
            self._restore_signals()
            self.logger.close()

    def close(self, clean: bool = True) -> None:
        dist.teardown(clean)
