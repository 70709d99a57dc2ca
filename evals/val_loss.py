"""Validation loss on a fixed slice of the validation shards.

The slice is the first ``num_tokens // seq_len`` sequences of the ``val`` split, laid out as
the training loader lays out a shard (sequence i of a shard = ``tokens[i*T : i*T + T + 1]``,
shards in manifest order, no shuffling): the same tokens at every eval, on every world size.
Rank r takes sequences ``r::world_size``; each rank runs the same number of fixed-shape
``(batch_size, seq_len)`` forwards (the last one padded with ignored targets), and the summed
loss and token count are all-reduced, so ``val/loss`` is the token-weighted mean over the slice.

``val/bpb`` (bits per byte, comparable across tokenizers) is nanochat's ``evaluate_bpb``
(``nanochat/loss_eval.py``): the summed nats of the slice's target tokens over ln 2 and the UTF-8
bytes those tokens stand for, each token counted by the bytes of its own byte sequence
(``data_pipeline.tokenizer.token_byte_lengths``; a token holding part of a multi-byte character
counts the bytes it holds, so nothing depends on where a character is split). ``<|endoftext|>``
is a separator, not text: 0 bytes, and its nats are left out of the numerator too.

The shards the slice reads are checked once, when the evaluator is built, through the same
``data_pipeline.store.ShardStore`` as the training loader: a half-finished prepare is refused
(unless ``allow_incomplete``), a remote ``data_dir`` (fsspec URL) has the shards it reads copied
into ``cache_dir`` first, each is hashed against the manifest's sha256 (a corrupt shard names the
file, both hashes and the rebuild command) and, with ``vocab_size``, its largest id -- taken in
the same read, never trusted from the manifest -- must be one the model can take (named with
shard and position). Every rank checks the same files, so all ranks agree without a collective.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch

from data_pipeline.shards import expected, read_shard
from data_pipeline.store import ShardStore, token_range_error
from data_pipeline.tokenizer import token_byte_lengths
from evals.common import autocast_for, eval_mode, stop_check
from pretrain import dist


class ValLossEvaluator:
    """``ValLossEvaluator(data_dir, seq_len, batch_size, num_tokens, rank, world_size, device)``;
    ``evaluator(model, step) -> {"val/loss", "val/ppl", "val/bpb", "val/tokens"}`` on every rank together.
    ``num_tokens=None`` evaluates the whole val split."""

    name = "val_loss"

    def __init__(self, data_dir: str | os.PathLike, seq_len: int, batch_size: int, num_tokens: int | None,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 vocab_size: int | None = None, verify: bool = True, cache_dir: str | os.PathLike | None = None,
                 allow_incomplete: bool = False, at_most: bool = False, knob: str = "eval.val_tokens",
                 store: ShardStore | None = None) -> None:
        """``at_most``: take at most ``num_tokens`` (all of a smaller split) instead of refusing a
        split that holds fewer; ``knob`` names the setting in messages (``--val-tokens`` for gpt2-eval).
        ``store``: ``data_dir``'s store as the run plan's data check opened it (its manifest read
        once per start, as the loader's ``info=``); None opens it here."""
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"val loss needs seq_len >= 1 and batch_size >= 1, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.seq_len, self.batch_size, self.device = seq_len, batch_size, torch.device(device)
        store = store if store is not None else ShardStore(data_dir, cache_dir)
        manifest = store.manifest
        manifest.check_complete(allow_incomplete)
        entries = manifest.entries("val")
        per_shard = [max(0, (int(n) - 1) // seq_len) for n in manifest.token_counts(entries)]
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
        self.shards: dict[int, np.ndarray] = {}
        for s in sorted({s for s, _ in where}):  # only the shards the slice reads (remote: fetched)
            path, entry = entries[s]
            exp = expected(path, entry) if verify or store.remote else None
            top = store.check(path, exp, entry) if exp is not None or vocab_size is not None else -1
            self.shards[s] = read_shard(path)
            if vocab_size is not None and top >= vocab_size:
                raise token_range_error(path, self.shards[s], vocab_size)
        per_rank = -(-wanted // world_size)  # ceil: every rank runs as many batches as rank 0
        # rows past a rank's share are padding: a batch larger than the share allocates no more of them
        # (--batch-size 99999999999 asked numpy for 47 TiB); the same on every rank
        self.batch_size = min(batch_size, max(per_rank, 1))
        self.num_batches = -(-per_rank // self.batch_size)
        self.token_bytes = np.zeros(2**16, dtype=np.int64)  # by token id (uint16 shards); ids past GPT-2's: 0
        self.token_bytes[:len(token_byte_lengths())] = token_byte_lengths()

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
        # [loss sum, tokens, ranks stopped, nats of the tokens that are text, their UTF-8 bytes]
        total = torch.zeros(5, dtype=torch.float64, device=self.device)
        for b in range(self.num_batches):
            if stopped():
                total[2] = 1
                break
            x, y = self._batch(b)
            nbytes = torch.from_numpy(self.token_bytes[y.clamp(min=0).numpy()])  # (B, T); padding rows: masked below
            nbytes[y == -100] = 0
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            nbytes = nbytes.to(self.device, non_blocking=True)
            with autocast_for(self.device):
                _, loss = model(x, y, reduction="none")  # (B, T) nats; 0 where ignored
            loss = loss.double().masked_fill(y == -100, 0.0)
            total[0] += loss.sum()
            total[1] += (y != -100).sum()
            total[3] += loss.masked_fill(nbytes == 0, 0.0).sum()
            total[4] += nbytes.sum()
        dist.all_reduce(total, "val loss")
        loss_sum, tokens, interrupted, text_nats, text_bytes = total.tolist()
        if interrupted:
            return {}
        mean = loss_sum / tokens
        out = {"val/loss": mean, "val/ppl": math.exp(min(mean, 700.0))}
        if text_bytes > 0:
            out["val/bpb"] = text_nats / math.log(2) / text_bytes
        return {**out, "val/tokens": tokens}

    def __call__(self, model, step: int | None = None, stop: Callable[[], bool] | None = None) -> dict[str, float]:
        with eval_mode(model):
            return self.evaluate(model, stop)
