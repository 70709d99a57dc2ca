"""Build a run's parts from its plan and hand them to the Trainer (torchtitan's builders -> Trainer).

::

    build_trainer(plan, evaluators)
      dist.setup                    process group, device            (pretrain/dist.py)
      move the earlier run aside    checkpoint.overwrite             (rundir.py)
      build_model                   seeded init, then model.init_from, then per-rank RNG streams
      wrap_model                    compile, DDP / FSDP2             (parallel.py)
      build_optimizer               AdamW | Muon + AdamW             (optim.py)
      build_loader                  the training stream              (data_pipeline/loader.py)
      Checkpointer, and the resume of plan.resume_from into model, optimizer and RNGs
      MetricsLogger                 the metrics log, TensorBoard, wandb (metrics.py)
      -> Trainer(plan, Parts(...))  the loop                         (trainer.py)

Nothing here recomputes what the plan resolved (batch numbers, the checkpoint to resume, the
weights to start from).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pretrain import dist
from pretrain.model import GPT
from pretrain.rundir.records import record_environment, write_config
from pretrain.training.metrics import (
    MetricsLogger,
    flops_per_token,
    resolve_peak,
    run_environment,
    startup_summary,
)
from pretrain.training.optim import build_optimizer
from pretrain.training.parallel import Wrapped, wrap_model
from pretrain.training.spikes import LossSpikeDetector

if TYPE_CHECKING:
    from pretrain.plan import RunPlan


@dataclass
class Parts:
    """What the Trainer runs: built here, from the plan."""

    info: dist.DistInfo
    wrapped: Wrapped
    optimizer: Any
    loader: Any
    checkpointer: Any
    logger: MetricsLogger
    evaluators: list = field(default_factory=list)
    spike: LossSpikeDetector | None = None
    flops_token: float = 0.0
    peak: float | None = None
    resumed: dict | None = None
    """The resumed checkpoint's trainer state (loaded into the Trainer), or None."""


def seed_rank_rngs(seed: int, rank: int) -> None:
    """Per-rank Python / NumPy / torch RNG streams (dropout, sampling), from train.seed and the rank."""
    s = seed + 1000 * rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def build_model(plan: RunPlan, info: dist.DistInfo) -> tuple[GPT, str | None]:
    """The plain model on the device: the same initial weights on every rank (seeded init, then
    ``model.init_from`` when the plan names a source), then each rank's own RNG stream. Returns
    the model and the line to log about its first weights (or None)."""
    cfg = plan.cfg
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.gpt_config)
    note = plan.init_note
    if plan.init_source is not None:
        from pretrain.training.init_from import init_from

        note = init_from(model, plan.init_source, model.config)
    seed_rank_rngs(cfg.train.seed, info.rank)
    return model.to(info.device), note


def build_loader(plan: RunPlan, info: dist.DistInfo):
    """This rank's training stream. With a batch-size warmup every step's batch is a multiple of
    the first one, so the loader's unit (and its step-boundary check on resume) is that batch."""
    from data_pipeline.loader import DistributedTokenLoader

    d, b = plan.cfg.data, plan.batch
    return DistributedTokenLoader(
        d.dir, "train", d.seq_len, b.micro_batch_size, b.loader_batch_seqs, rank=info.rank,
        world_size=info.world_size, seed=d.seed, shuffle=d.shuffle, device=info.device,
        vocab_size=plan.cfg.gpt_config.vocab_size,  # ids >= vocab_size are refused at the data
        cache_dir=d.cache_dir, allow_incomplete=d.allow_incomplete, info=plan.train_split,
    )


def move_previous_run_aside(plan: RunPlan, info: dist.DistInfo) -> None:
    """checkpoint.overwrite: the whole previous run (checkpoints, metrics, config, eval files) goes
    into one dated folder together, so the run that was kept stays readable."""
    if not plan.move_aside:
        return
    from pretrain.rundir.lock import move_run_aside

    dist.barrier("before moving the previous run aside")
    if info.is_main:
        aside = move_run_aside(plan.run_dir)
        print(f"checkpoint.overwrite: moved the previous run in {plan.run_dir} to {aside}", flush=True)
    dist.barrier("after moving the previous run aside")


def build_trainer(plan: RunPlan, evaluators: list | tuple = ()):
    """The Trainer of ``plan``, every part built and the resumed checkpoint (if any) loaded."""
    from pretrain.checkpoint import Checkpointer, restore_rng_state
    from pretrain.training.host_memory import keep_freed_memory
    from pretrain.training.trainer import Trainer

    cfg = plan.cfg
    if cfg.train.reuse_host_memory:
        keep_freed_memory()  # before the model and the first step allocate
    info = dist.setup(cfg.train.device, cfg.distributed.backend, cfg.distributed.timeout_s,
                      need_group=cfg.distributed.mode == "fsdp")
    if info.world_size != plan.world_size:
        raise RuntimeError(f"the plan is for world size {plan.world_size}, the process group has {info.world_size}")
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    move_previous_run_aside(plan, info)

    model, init_note = build_model(plan, info)
    g = model.config
    flops_token = flops_per_token(model.num_params(exclude_embeddings=True), g.n_layer, g.n_head,
                                  g.n_embd // g.n_head, cfg.data.seq_len)
    n_params = model.num_params()
    t = cfg.train
    wrapped = wrap_model(model, cfg.distributed.mode, info.device, info.distributed, compile=t.compile,
                         dtype=t.dtype, activation_checkpointing=t.activation_checkpointing)
    optimizer = build_optimizer(wrapped.module, cfg.optim, info.device)
    loader = build_loader(plan, info)
    checkpointer = Checkpointer(plan.ckpt_dir, cfg.checkpoint.keep_last, info.rank, info.world_size,
                                async_save=cfg.checkpoint.async_save)
    resumed = None
    if plan.resume_from is not None:
        resumed, rank_state = checkpointer.load(plan.resume_from, wrapped.module, optimizer, fsdp=wrapped.fsdp)
        if rank_state is not None:
            restore_rng_state(rank_state["rng"])
        else:  # a rank the saving run did not have: a fresh stream, distinct from the old ranks'
            torch.manual_seed(t.seed + 1000 * info.rank + int(resumed["step"]))
    resuming = plan.resume_from is not None
    logger = MetricsLogger(
        plan.run_dir, enabled=info.is_main, wandb_mode=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
        wandb_name=cfg.logging.wandb_name, config=cfg.to_dict(), resume_step=plan.resume_step if resuming else None,
        tensorboard=cfg.logging.tensorboard, resume_tokens=plan.resume_tokens if resuming else None,
    )
    peak, peak_source = resolve_peak(info.device, t.dtype, t.peak_tflops)
    if info.is_main:
        write_config(plan.run_dir, cfg.to_yaml())
        env = run_environment(info.device, info.world_size, wrapped.mode, t.dtype, t.compile, peak, peak_source)
        env["config"] = cfg.to_dict()  # what this start ran with (config.yaml holds the last start's only)
        if plan.init_source is not None:  # the weights this run started from: the model card states them
            from pretrain.model.weights import provenance

            env["init_from"] = provenance(plan.init_source)
        record_environment(plan.run_dir, env, plan.resume_step if plan.resume_from is not None else None)
    logger.print("resolved config:\n" + cfg.to_yaml().rstrip())
    logger.print(startup_summary(
        world_size=info.world_size, mode=wrapped.mode, device=info.device, n_params=n_params,
        tokens_per_step=plan.batch.tokens_per_step, micro_batch=plan.batch.micro_batch_size, seq_len=cfg.data.seq_len,
        accum=plan.batch.grad_accum_steps, max_steps=cfg.schedule.max_steps, start_step=plan.resume_step,
        total_tokens=plan.batch.total_tokens, flops_token=flops_token, peak=peak, dtype=t.dtype, compile=t.compile,
        peak_source=peak_source,
    ))
    if resuming:
        logger.print(f"resumed from {plan.resume_from} at step {plan.resume_step} ({plan.resume_tokens:,} tokens seen)")
    if init_note:
        logger.print(init_note)
    spike = LossSpikeDetector(window=t.spike_window, threshold=t.spike_threshold) if t.spike_detection else None
    parts = Parts(info=info, wrapped=wrapped, optimizer=optimizer, loader=loader, checkpointer=checkpointer,
                  logger=logger, evaluators=list(evaluators), spike=spike, flops_token=flops_token,
                  peak=peak, resumed=resumed)
    return Trainer(plan, parts)
