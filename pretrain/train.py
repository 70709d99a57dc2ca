"""The torchrun target: parse the config, build the Trainer with its evaluators, train.

    python pretrain/train.py --config configs/smoke_cpu.yaml
    torchrun --nproc_per_node=8 pretrain/train.py --config configs/gpt2_124m.yaml [section.key=value ...]
    gpt2-train --config configs/gpt2_124m.yaml --resume none optim.lr=3e-4

Multi-node with restarts (torchrun --max-restarts N): export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
first; torchrun's shared rendezvous store otherwise hands restarted workers stale peer addresses
and they hang in init (pytorch#135712).

Exit codes: 0 done; 2 bad configuration, data, paths or resume, or train.run_dir in use by
another trainer (one line on stderr, before the model is built; see docs/DESIGN.md "Failures");
75 (EX_TEMPFAIL) preempted by SIGTERM / SIGUSR1 after a checkpoint of the current step
(requeue and the run resumes from it); 130 Ctrl-C (SIGINT) after a checkpoint of the current
step (a second Ctrl-C aborts at once, keeping the newest checkpoint); 1 any other failure
(diverged, checkpoint error, a collective failed because a peer crashed, hangs or cannot be
reached: one line naming it, no traceback, ...).

Order of start-up: config -> data (every shard's header and size) -> evaluator inputs ->
resume compatibility (the checkpoint's step and loader state against this config and data) ->
rank 0 takes the run directory's lock (pretrain/rundir/lock.py) -> only then is anything in
train.run_dir created, moved or written, and the model built.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from data_pipeline.arguments import Parser

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    from pretrain.config import help_text

    p = Parser(
        prog="gpt2-train",
        description="Pretrain GPT-2 (single process or under torchrun).",
        epilog=help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config (e.g. configs/gpt2_124m.yaml); defaults < YAML < overrides")
    p.add_argument("--resume", help="auto (newest checkpoint in run_dir, default) | none | PATH "
                                    "(same as checkpoint.resume=...)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. optim.lr=3e-4")
    return p


def resume_command(argv: list[str]) -> str:
    """The command that continues this run from its newest checkpoint."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith(("--resume=", "checkpoint.resume=", "checkpoint.overwrite=")):
            keep.append(a)
    prog = "torchrun [same options] pretrain/train.py" if "TORCHELASTIC_RUN_ID" in os.environ else "gpt2-train"
    return f"{prog} {shlex.join(keep + ['--resume', 'auto'])}"


def build_evaluators(plan, rank: int, world_size: int, device) -> list:
    """Val loss, HellaSwag, the sample, harness tasks and CORE, from evals/ (imported here, never by
    the trainer). They read their data (val shards, the HellaSwag file, the tasks' documents, the
    CORE bundle) when built, so building them before the model checks those inputs early."""
    cfg, e = plan.cfg, plan.cfg.eval
    if e.interval <= 0:
        return []
    from evals.hellaswag import HellaSwagEvaluator
    from evals.sample import SampleEvaluator
    from evals.val_loss import ValLossEvaluator

    evaluators = []
    batch = plan.batch.eval_batch_size
    if e.val_tokens > 0:
        evaluators.append(ValLossEvaluator(cfg.data.dir, cfg.data.seq_len, batch, e.val_tokens, rank, world_size,
                                           device, vocab_size=cfg.gpt_config.vocab_size,
                                           cache_dir=cfg.data.cache_dir, allow_incomplete=cfg.data.allow_incomplete,
                                           store=plan.train_split.store))
    if e.hellaswag:
        evaluators.append(HellaSwagEvaluator(e.hellaswag_path, e.hellaswag_limit, batch, rank, world_size, device))
    if e.sample_prompt and e.sample_tokens > 0:
        from functools import partial

        from pretrain.training.parallel import training_autocast, uses_mp_policy

        mp = uses_mp_policy(cfg.distributed.mode, device, cfg.train.dtype)
        sample = SampleEvaluator(e.sample_prompt, e.sample_tokens, e.sample_top_k, cfg.train.seed,
                                 autocast=partial(training_autocast, device, cfg.train.dtype, mp))
        why = sample.unfit(cfg.gpt_config)
        if why and rank == 0:
            print(f"note: eval.sample_prompt: {why}; no sample is logged (shorten it, or set eval.sample_prompt='')",
                  file=sys.stderr)
        evaluators.append(sample)
    if e.tasks:  # lm-evaluation-harness (the optional extra; load_config checked it is installed)
        from evals.tasks import TaskEvaluator

        evaluators.append(TaskEvaluator(e.tasks, e.tasks_limit, batch, device, include_path=e.tasks_include_path,
                                        fsdp=cfg.distributed.mode == "fsdp", world_size=world_size))
    if e.core:  # DCLM CORE on nanochat's eval_bundle: read, checked and tokenized here
        from evals.core import CoreEvaluator

        evaluators.append(CoreEvaluator(e.core, e.core_limit, batch, rank, world_size, device,
                                        block_size=cfg.gpt_config.block_size))
    return evaluators


def write_run_report(run_dir) -> None:
    """RUN_DIR/report.md once a run has finished (``pretrain/report.py``; ``gpt2-report RUN_DIR``
    writes it on demand). A report that cannot be written is a warning: the run itself is done."""
    from pretrain.report import write_report

    try:
        print(f"run report: {write_report(run_dir)}", flush=True)
    except Exception as e:  # noqa: BLE001 - the checkpoints and metrics are safe; say why and go on
        print(f"gpt2-train: warning: could not write {run_dir}/report.md ({type(e).__name__}: {e}); "
              f"run gpt2-report {run_dir} to retry", file=sys.stderr)


def _error(msg: str) -> int:
    print(f"gpt2-train: error: {msg}", file=sys.stderr)
    return EXIT_CONFIG


def start(argv: list[str]):
    """Config -> run plan -> evaluators: every check that can refuse, before anything is written.
    Returns ``(plan, rank, evaluators)``, or the exit code (a refusal, ``--print-config``, Ctrl-C)."""
    from data_pipeline.shards import ShardError
    from pretrain.config import ConfigError, load_config, world_size_from_env

    # intermixed: options may come after key=value overrides and before further ones
    args = build_parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        from pretrain.dist import env_int, pick_device
        from pretrain.plan import make_plan

        plan = make_plan(cfg, world_size_from_env())
        rank = env_int("RANK", 0)
        device = pick_device(cfg.train.device, env_int("LOCAL_RANK", 0))
        return plan, rank, build_evaluators(plan, rank, plan.world_size, device)
    except (ConfigError, ShardError, ValueError, OSError) as e:  # evaluator inputs: val shards, the HellaSwag file
        return _error(str(e))
    except KeyboardInterrupt:
        print("gpt2-train: interrupted (Ctrl-C) during the start-up checks; nothing was written", file=sys.stderr)
        return 130


def lock_run_dir(plan, argv: list[str]):
    """Rank 0 takes train.run_dir's lock (one trainer per run directory, from before anything in it
    changes). Returns the lock, or the exit code of a refusal."""
    from pretrain.rundir.lock import RunDirBusy, RunDirLock

    lock = RunDirLock(plan.run_dir)
    try:
        lock.acquire(command=shlex.join(["gpt2-train", *argv]))
    except RunDirBusy as e:
        return _error(str(e))
    except OSError as e:
        return _error(f"train.run_dir={str(plan.run_dir)!r}: cannot create or lock it ({e.strerror or e}); choose a "
                      "writable train.run_dir on a filesystem with POSIX locks (launch/README.md)")
    return lock


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    started = start(argv)
    if isinstance(started, int):
        return started
    plan, rank, evaluators = started
    lock = lock_run_dir(plan, argv) if rank == 0 else None
    if isinstance(lock, int):
        return lock
    try:
        return train(plan, rank, evaluators, argv)
    finally:
        if lock is not None:
            lock.release()


def train(plan, rank: int, evaluators: list, argv: list[str]) -> int:
    """Build the parts, train, and turn every way a run ends into its exit code and one line."""
    from data_pipeline.shards import ShardError
    from pretrain.checkpoint import CheckpointError
    from pretrain.config import ConfigError
    from pretrain.dist import CollectiveError
    from pretrain.training.build import build_trainer
    from pretrain.training.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED
    from pretrain.training.spikes import LossSpikeError
    from pretrain.training.trainer import NonFiniteError

    trainer, clean = None, False
    try:
        try:
            trainer = build_trainer(plan, evaluators)
        except (ConfigError, ShardError) as e:
            return _error(str(e))
        rc = trainer.train()
        clean = True
        if rc == 0 and rank == 0:
            write_run_report(plan.run_dir)
        if rc in (EXIT_PREEMPTED, EXIT_INTERRUPTED) and rank == 0:
            print(f"gpt2-train: stopped at step {trainer.step} (checkpointed); resume with: "
                  f"{resume_command(argv)}", file=sys.stderr)
        return rc
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        if rank == 0:
            print(f"gpt2-train: aborted (Ctrl-C); the newest checkpoint in {plan.ckpt_dir} is kept; "
                  f"resume with: {resume_command(argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (NonFiniteError, CheckpointError, LossSpikeError) as e:
        print(f"gpt2-train: rank {rank}: error: {e}", file=sys.stderr)
        return 1
    except ShardError as e:  # bad data (corrupt shard, ids the model cannot take): one line, exit 2
        print(f"gpt2-train: rank {rank}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except CollectiveError as e:  # a peer crashed, hangs or is unreachable: expected, and its line says all
        print(f"gpt2-train: rank {rank}: CollectiveError: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        print(f"gpt2-train: rank {rank}: {type(e).__name__}: {e}", file=sys.stderr)
        raise
    finally:
        if trainer is not None:
            trainer.close(clean)
        else:
            from pretrain.dist import teardown

            teardown(clean=False)


def cli() -> None:
    """The ``gpt2-train`` command (and ``python pretrain/train.py``): :func:`main`, then an exit
    that gloo's threads cannot turn into an abort (``pretrain.dist.exit_process``). A Ctrl-C
    before training starts (while torch and the rest are imported) ends in one line, exit 130."""
    from pretrain.cli import run

    run(main, "gpt2-train: interrupted (Ctrl-C) during start-up; nothing was written")


if __name__ == "__main__":
    cli()
