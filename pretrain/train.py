"""The torchrun target: parse the config, build the Trainer with its evaluators, train.

    python pretrain/train.py --config configs/smoke_cpu.yaml
    torchrun --nproc_per_node=8 pretrain/train.py --config configs/gpt2_124m.yaml [section.key=value ...]
    gpt2-train --config configs/gpt2_124m.yaml --resume none optim.lr=3e-4

Multi-node with restarts (torchrun --max-restarts N): export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
first; torchrun's shared rendezvous store otherwise hands restarted workers stale peer addresses
and they hang in init (pytorch#135712).

Exit codes: 0 done; 2 bad configuration or data (one line on stderr, before any work);
75 (EX_TEMPFAIL) preempted by SIGTERM / SIGUSR1 after a checkpoint of the current step
(requeue and the run resumes from it); 1 any other failure (diverged, checkpoint error, ...).
"""

from __future__ import annotations

import argparse
import os
import sys

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


def check_data(cfg) -> None:
    """The data directory must hold training shards; else say which command makes them."""
    from data_pipeline.shards import ShardError, list_shards
    from pretrain.config import ConfigError

    try:
        list_shards(cfg.data.dir, "train")
    except ShardError:
        raise ConfigError(
            f"data.dir={cfg.data.dir!r} holds no training shards; create them with: {cfg.data.prepare_command}"
        ) from None


def build_evaluators(cfg, info) -> list:
    """Val loss and HellaSwag from evals/ (imported here, never by the trainer)."""
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


def main(argv: list[str] | None = None) -> int:
    from pretrain.config import ConfigError, load_config

    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg, _ = load_config(args.config, overrides)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        check_data(cfg)
    except ConfigError as e:
        print(f"gpt2-train: error: {e}", file=sys.stderr)
        return EXIT_CONFIG

    from data_pipeline.shards import ShardError
    from pretrain.checkpoint import CheckpointError
    from pretrain.guards import LossSpikeError
    from pretrain.trainer import NonFiniteError, Trainer

    trainer = Trainer(cfg)
    clean = False
    try:
        try:
            trainer.build()
        except ConfigError as e:
            print(f"gpt2-train: error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        trainer.evaluators.extend(build_evaluators(cfg, trainer.info))
        rc = trainer.train()
        clean = True
        return rc
    except (NonFiniteError, CheckpointError, LossSpikeError) as e:
        print(f"gpt2-train: rank {os.environ.get('RANK', '0')}: error: {e}", file=sys.stderr)
        return 1
    except ShardError as e:  # bad data (corrupt shard, ids the model cannot take): one line, exit 2
        print(f"gpt2-train: rank {os.environ.get('RANK', '0')}: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:
        rank = os.environ.get("RANK", "0")
        print(f"gpt2-train: rank {rank}: {type(e).__name__}: {e}", file=sys.stderr)
        raise
    finally:
        trainer.close(clean)


if __name__ == "__main__":
    sys.exit(main())
