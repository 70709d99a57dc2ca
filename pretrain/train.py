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
(diverged, checkpoint error, ...).

Order of start-up: config -> data (every shard's header and size) -> evaluator inputs ->
resume compatibility (the checkpoint's step and loader state against this config and data) ->
rank 0 takes the run directory's lock (pretrain/rundir.py) -> only then is anything in
train.run_dir created, moved or written, and the model built.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    from pretrain.config import help_text

    p = argparse.ArgumentParser(
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


def check_data(cfg, derived):
    """The data directory must hold training shards, each whole (header and size) and holding a
    micro-batch; else say which command makes them. Returns the (CPU) training loader it built
    to check them, for ``check_resume``."""
    from data_pipeline.loader import DistributedTokenLoader
    from data_pipeline.shards import ShardError, list_shards
    from pretrain.config import ConfigError

    try:
        list_shards(cfg.data.dir, "train")
    except ShardError:
        raise ConfigError(
            f"data.dir={cfg.data.dir!r} holds no training shards; create them with: {cfg.data.prepare_command}"
        ) from None
    try:
        return DistributedTokenLoader(
            cfg.data.dir, "train", cfg.data.seq_len, cfg.train.micro_batch_size, derived.loader_batch_seqs,
            rank=0, world_size=derived.world_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle, device="cpu",
            vocab_size=cfg.gpt_config.vocab_size)  # token range from the manifest; no hashing until a batch
    except (ShardError, ValueError) as e:
        raise ConfigError(f"{e} (data.dir={cfg.data.dir!r}; rebuild with: {cfg.data.prepare_command})") from None


def check_run_dir(cfg) -> None:
    """train.run_dir must be a directory or creatable as one (nothing is created here)."""
    from pretrain.config import ConfigError

    d = Path(cfg.train.run_dir)
    p = d
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"train.run_dir={str(d)!r}: {p} exists and is not a directory; choose another train.run_dir")


def check_resume(cfg, loader) -> None:
    """Before the model is built: the checkpoint to resume from is one, is not past
    schedule.max_steps, and its loader state fits this data, sequence length and global batch."""
    import torch

    from pretrain.config import ConfigError
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.check_resume_target()
    path = trainer.resume_path()
    if path is None:
        return
    state_file = path / "trainer_state.pt"
    if not state_file.is_file():
        raise ConfigError(f"checkpoint.resume={str(path)!r} is not a checkpoint (no {state_file.name}); pass the "
                          "path of a step_XXXXXXXX directory, auto or none")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        step, loader_state = int(state["step"]), state["loader"]
    except Exception as e:  # unpickling / zip / key errors all mean the same here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{state_file}: unreadable trainer state ({first}); resume from another checkpoint "
                          "(--resume PATH) or start over (--resume none)") from None
    max_steps = cfg.schedule.max_steps
    if step > max_steps:
        # Ending at once would call a run "done" that never ran to this max_steps and rewrite its
        # config.yaml with a schedule its weights did not follow: refuse instead.
        raise ConfigError(
            f"{path} is at step {step}, past schedule.max_steps={max_steps}; pass schedule.max_steps >= {step} "
            f"to continue it, or start a new run (--resume none, another train.run_dir)")
    try:
        loader.load_state_dict(loader_state)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot resume from {path}: {e}") from None


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


def build_evaluators(cfg, info) -> list:
    """Val loss and HellaSwag from evals/ (imported here, never by the trainer). They read their
    data (val shards, the HellaSwag file) when built, so building them before the model checks
    those inputs early."""
    evaluators = []
    e = cfg.eval
    if e.interval <= 0:
        return evaluators
    batch = e.batch_size or cfg.train.micro_batch_size
    if e.val_tokens > 0:
        try:
            from evals.val_loss import ValLossEvaluator
        except ImportError as err:
            print(f"[train] val loss skipped: evals.val_loss unavailable ({err})", file=sys.stderr)
        else:
            evaluators.append(ValLossEvaluator(cfg.data.dir, cfg.data.seq_len, batch, e.val_tokens,
                                               info.rank, info.world_size, info.device,
                                               vocab_size=cfg.gpt_config.vocab_size))
    if e.hellaswag:
        try:
            from evals.hellaswag import HellaSwagEvaluator
        except ImportError as err:
            print(f"[train] HellaSwag skipped: evals.hellaswag unavailable ({err})", file=sys.stderr)
        else:
            evaluators.append(HellaSwagEvaluator(e.hellaswag_path, e.hellaswag_limit, batch,
                                                 info.rank, info.world_size, info.device))
    return evaluators


def _rank_and_device(cfg) -> SimpleNamespace:
    """What the evaluators need before the process group exists: rank, world size, device."""
    from pretrain.dist import env_int, pick_device

    return SimpleNamespace(rank=env_int("RANK", 0), world_size=env_int("WORLD_SIZE", 1),
                           device=pick_device(cfg.train.device, env_int("LOCAL_RANK", 0)))


def _error(msg: str) -> int:
    print(f"gpt2-train: error: {msg}", file=sys.stderr)
    return EXIT_CONFIG


def main(argv: list[str] | None = None) -> int:
    from data_pipeline.shards import ShardError
    from pretrain.config import ConfigError, load_config

    argv = sys.argv[1:] if argv is None else list(argv)
    # intermixed: options may come after key=value overrides and before further ones
    args = build_parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg, derived = load_config(args.config, overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        loader = check_data(cfg, derived)
        evaluators = build_evaluators(cfg, _rank_and_device(cfg))
        check_resume(cfg, loader)
        check_run_dir(cfg)
    except ConfigError as e:
        return _error(str(e))
    except (ShardError, ValueError, OSError) as e:  # evaluator inputs: val shards, the HellaSwag file
        return _error(str(e))
    except KeyboardInterrupt:
        print("gpt2-train: interrupted (Ctrl-C) during the start-up checks; nothing was written", file=sys.stderr)
        return 130

    from data_pipeline.shards import ShardError
    from pretrain.checkpoint import CheckpointError
    from pretrain.guards import LossSpikeError
    from pretrain.rundir import RunDirBusy, RunDirLock
    from pretrain.trainer import EXIT_INTERRUPTED, EXIT_PREEMPTED, NonFiniteError, Trainer

    rank = int(os.environ.get("RANK", "0"))
    lock = RunDirLock(cfg.train.run_dir)
    if rank == 0:  # one trainer per run directory, from before anything in it changes
        try:
            lock.acquire(command=shlex.join(["gpt2-train", *argv]))
        except RunDirBusy as e:
            return _error(str(e))
        except OSError as e:
            return _error(f"train.run_dir={cfg.train.run_dir!r}: cannot create or lock it "
                          f"({e.strerror or e}); choose a writable train.run_dir on a filesystem with "
                          "POSIX locks (launch/README.md)")
    trainer = Trainer(cfg)
    clean = False
    try:
        try:
            trainer.build()
        except (ConfigError, ShardError) as e:
            return _error(str(e))
        trainer.evaluators.extend(evaluators)
        rc = trainer.train()
        clean = True
        if rc in (EXIT_PREEMPTED, EXIT_INTERRUPTED) and rank == 0:
            print(f"gpt2-train: stopped at step {trainer.step} (checkpointed); resume with: "
                  f"{resume_command(argv)}", file=sys.stderr)
        return rc
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        if rank == 0:
            print(f"gpt2-train: aborted (Ctrl-C); the newest checkpoint in {trainer.ckpt_dir} is kept; "
                  f"resume with: {resume_command(argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (NonFiniteError, CheckpointError, LossSpikeError) as e:
        print(f"gpt2-train: rank {rank}: error: {e}", file=sys.stderr)
        return 1
    except ShardError as e:  # bad data (corrupt shard, ids the model cannot take): one line, exit 2
        print(f"gpt2-train: rank {os.environ.get('RANK', '0')}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:
        print(f"gpt2-train: rank {rank}: {type(e).__name__}: {e}", file=sys.stderr)
        raise
    finally:
        try:
            trainer.close(clean)
        finally:
            lock.release()


def cli() -> None:
    """The ``gpt2-train`` command (and ``python pretrain/train.py``): :func:`main`, then an exit
    that gloo's threads cannot turn into an abort (``pretrain.dist.exit_process``)."""
    from pretrain.dist import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
