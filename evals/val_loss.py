"""Validation loss on a fixed slice of the validation shards.

The slice is the first ``num_tokens // seq_len`` sequences of the ``val`` split, laid out as
the training loader lays out a shard (sequence i of a shard = ``tokens[i*T : i*T + T + 1]``,
shards in manifest order, no shuffling): the same tokens at every eval, on every world size.
Rank r takes sequences ``r::world_size``; each rank runs the same number of fixed-shape
``(batch_size, seq_len)`` forwards (the last one padded with ignored targets), and the summed
loss and token count are all-reduced, so ``val/loss`` is the token-weighted mean over the slice.

The shards the slice reads are checked once, when the evaluator is built: against the
manifest's sha256 (a corrupt shard names the file, both hashes and the rebuild command) and,
with ``vocab_size``, for ids the model cannot take (named with shard and position). Every rank
checks the same files, so all ranks agree without a collective.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch

from data_pipeline import integrity
from data_pipeline.loader import integrity_error, token_range_error
from data_pipeline.shards import expected, read_shard, shard_entries
from evals.common import autocast_for, eval_mode, stop_check
from pretrain import dist


class ValLossEvaluator:
    """``ValLossEvaluator(data_dir, seq_len, batch_size, num_tokens, rank, world_size, device)``;
    ``evaluator(model, step) -> {"val/loss", "val/ppl", "val/tokens"}`` on every rank together.
    ``num_tokens=None`` evaluates the whole val split."""

    name = "val_loss"

    def __init__(self, data_dir: str | os.PathLike, seq_len: int, batch_size: int, num_tokens: int | None,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 vocab_size: int | None = None, verify: bool = True, at_most: bool = False,
                 knob: str = "eval.val_tokens") -> None:
        """``at_most``: take at most ``num_tokens`` (all of a smaller split) instead of refusing a
        split that holds fewer; ``knob`` names the setting in messages (``--val-tokens`` for gpt2-eval)."""
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"val loss needs seq_len >= 1 and batch_size >= 1, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.seq_len, self.batch_size, self.device = seq_len, batch_size, torch.device(device)
        entries = shard_entries(data_dir, "val")
        self.shards = [read_shard(p) for p, _ in entries]
        per_shard = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        available = sum(per_shard)
        if num_tokens is None:
            wanted = available
        else:
            wanted = num_tokens // seq_len
            if wanted < 1:
                raise ValueError(f"{knob}={num_tokens} is less than one sequence of {seq_len} tokens; raise it")
            if at_most:
                wanted = min(wanted, available)
            elif wanted > available:
                raise ValueError(
                    f"{data_dir}: the val shards hold {available} sequences of {seq_len} tokens "
                    f"({available * seq_len} tokens), fewer than {knob}={num_tokens} asks for; "
                    f"lower {knob} or prepare more validation data"
                )
        if wanted < 1:
            raise ValueError(f"{data_dir}: the val shards hold no full sequence of {seq_len + 1} tokens")
        self.num_sequences = wanted
        # (shard, start) of every global sequence, then this rank's share.
        where = [(s, i * seq_len) for s, n in enumerate(per_shard) for i in range(n)][:wanted]
        self.mine = where[rank::world_size]
        used = sorted({s for s, _ in where})
        self._check([entries[s] for s in used], [self.shards[s] for s in used], data_dir, vocab_size, verify)
        per_rank = -(-wanted // world_size)  # ceil: every rank runs as many batches as rank 0
        self.num_batches = -(-per_rank // batch_size)

    @staticmethod
    def _check(entries, shards, data_dir, vocab_size: int | None, verify: bool) -> None:
        """The used shards hold what their manifest says, and only ids below ``vocab_size``."""
        from pathlib import Path

        if verify:
            records = [e for e in (expected(p, entry) for p, entry in entries) if e is not None]
            bad = integrity.verify_files(records)
            if bad:
                raise integrity_error(bad[0], Path(data_dir))
        if vocab_size is None:
            return
        for (path, entry), tokens in zip(entries, shards):
            top = entry.get("max_token_id") if entry else None
            if not isinstance(top, int):
                top = int(tokens.max()) if len(tokens) else -1
            if top >= vocab_size:
                raise token_range_error(path, tokens, vocab_size)

    def _batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        rows = self.mine[b * B:(b + 1) * B]
        buf = np.zeros((B, T + 1), dtype=np.int64)
        for r, (s, start) in enumerate(rows):
            buf[r] = self.shards[s][start:start + T + 1]
        t = torch.from_numpy(buf)
        x, y = t[:, :-1].clone(), t[:, 1:].clone()  # (B, T) each
        y[len(rows):] = -100  # padding rows are ignored
        return x, y

    interruptible = True  # the trainer passes ``stop``: a Ctrl-C ends the evaluation between batches

    @torch.inference_mode()
    def evaluate(self, model, stop: Callable[[], bool] | None = None) -> dict[str, float]:
        """The metrics, or ``{}`` when ``stop()`` became True on any rank before the last batch."""
        stopped = stop_check(model, stop)
        total = torch.zeros(3, dtype=torch.float64, device=self.device)  # [loss sum, tokens, ranks stopped]
        for b in range(self.num_batches):
            if stopped():
                total[2] = 1
                break
            x, y = self._batch(b)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast_for(self.device):
                _, loss = model(x, y, reduction="sum")
            total[0] += loss.double()
            total[1] += (y != -100).sum()
        dist.all_reduce(total, "val loss")
        loss_sum, tokens, interrupted = total.tolist()
        if interrupted:
            return {}
        mean = loss_sum / tokens
        return {"val/loss": mean, "val/ppl": math.exp(min(mean, 700.0)), "val/tokens": tokens}

    def __call__(self, model, step: int | None = None, stop: Callable[[], bool] | None = None) -> dict[str, float]:
        with eval_mode(model):
            return self.evaluate(model, stop)
