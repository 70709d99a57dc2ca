"""The distributed, resumable token loader over llm.c shards.

The data of a split is one *global stream* of sequences per epoch::

    shard s holds n_s tokens -> (n_s - 1) // T sequences; sequence i = tokens[i*T : i*T + T + 1]
    epoch e: shards in order perm(seed, e)            (identity when shuffle=False)
             sequences of shard s in order perm(seed, e, s)
    stream  = epoch 0 sequences, epoch 1 sequences, ...   (infinite)

One optimizer step consumes ``global_batch_seqs`` consecutive sequences of the stream whatever
the world size W. With micro-batch B there are ``global_batch_seqs // (W*B)`` micro-steps per
step, and micro-step m of rank r reads stream positions ``base + m*W*B + r*B + [0, B)``::

    step k:   |-- m=0: r0 r1 .. rW-1 --|-- m=1: r0 r1 .. --| ...   (each cell B sequences)

so ranks are disjoint, together they cover the global batch, and the token order of a run
depends on the seed and the global batch only: a run can resume on another world size at a
step boundary. The only state is the number of stream sequences consumed, identical on every
rank, so ``state_dict()`` is the same everywhere and resuming is exact mid-shard, across shard
boundaries and across epochs.

Shards are memory-mapped (never read whole); a batch gathers B rows of T+1 tokens from the
maps (one fancy index per run of rows within a shard) and widens uint16 -> int64 into one
``(2, B, T)`` tensor whose halves are ``x`` and ``y``. On CUDA the batch goes through pinned memory with a
non-blocking copy.

For validation loss, build a fresh loader with ``shuffle=False`` each time and take the first
k batches: that is always the same fixed prefix of the val split.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.shards import ShardError, list_shards, read_header, read_shard

_STATE_VERSION = 1


class DistributedTokenLoader:
    """Yields ``(x, y)`` int64 ``(micro_batch_size, seq_len)`` batches for one rank; see the module doc."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        seq_len: int,
        micro_batch_size: int,
        global_batch_seqs: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        device: str | torch.device = "cpu",
    ) -> None:
        for name, v in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size),
                        ("global_batch_seqs", global_batch_seqs), ("world_size", world_size)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"DistributedTokenLoader: {name} must be a positive int, got {v!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"DistributedTokenLoader: rank {rank} is outside world_size {world_size}")
        if global_batch_seqs % (micro_batch_size * world_size):
            raise ValueError(
                f"DistributedTokenLoader: global_batch_seqs={global_batch_seqs} is not divisible by "
                f"micro_batch_size*world_size={micro_batch_size}*{world_size}; change the batch sizes"
            )
        self.data_dir = Path(data_dir)
        self.split = split
        self.T = seq_len
        self.B = micro_batch_size
        self.global_batch_seqs = global_batch_seqs
        self.rank = rank
        self.world_size = world_size
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()

        self.files = list_shards(self.data_dir, split)
        self.shard_tokens = np.array([read_header(f) for f in self.files], dtype=np.int64)
        need = self.B * self.T + 1
        for f, n in zip(self.files, self.shard_tokens):
            if n < need:
                raise ShardError(
                    f"{f}: shard holds {int(n)} tokens, fewer than one micro-batch "
                    f"(micro_batch_size*seq_len+1 = {need}); re-run prepare with a larger --shard-tokens "
                    "or lower the batch size / sequence length"
                )
        self.shard_seqs = (self.shard_tokens - 1) // self.T
        self.num_sequences = int(self.shard_seqs.sum())
        if self.num_sequences < self.global_batch_seqs:
            raise ShardError(
                f"{self.data_dir}: split '{split}' holds {self.num_sequences} sequences of {self.T} tokens, "
                f"fewer than one global batch ({self.global_batch_seqs}); prepare more tokens "
                "(--val-tokens / --max-tokens) or lower the batch size"
            )
        self._consumed = 0  # stream position of the next micro-step's rank-0 row
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perm_cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def grad_accum_steps(self) -> int:
        """Micro-steps per optimizer step on each rank."""
        return self.global_batch_seqs // (self.B * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        """Full optimizer steps in one pass over the split."""
        return self.num_sequences // self.global_batch_seqs

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_seqs * self.T

    @property
    def epoch(self) -> int:
        return self._consumed // self.num_sequences

    # ---- the stream --------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, cumulative sequence counts in that order) for ``epoch``."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            n = len(self.files)
            order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                     else np.arange(n))
            self._epoch_cache = (epoch, order, np.cumsum(self.shard_seqs[order]))
        return self._epoch_cache[1], self._epoch_cache[2]

    def _seq_perm(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        perm = self._perm_cache.get(key)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch, shard]).permutation(int(self.shard_seqs[shard]))
            self._perm_cache[key] = perm
            while len(self._perm_cache) > 4:
                self._perm_cache.popitem(last=False)
        return perm

    def _rows(self, shard: int) -> np.ndarray:
        """Shard ``shard`` as a ``(num_seqs, T+1)`` overlapping-rows view of its memmap (no copy)."""
        rows = self._maps.get(shard)
        if rows is not None:
            self._maps.move_to_end(shard)
        else:
            tokens = read_shard(self.files[shard]).view(np.ndarray)  # plain ndarray: cheaper to index
            n, item = int(self.shard_seqs[shard]), tokens.itemsize
            # row i = tokens[i*T : i*T + T + 1]: rows overlap by one token (y is x shifted by one)
            rows = np.lib.stride_tricks.as_strided(tokens, shape=(n, self.T + 1), strides=(self.T * item, item),
                                                   writeable=False)
            self._maps[shard] = rows
            while len(self._maps) > 8:  # bounded number of open maps
                self._maps.popitem(last=False)
        return rows

    def _segments(self, first: int, count: int) -> list[tuple[int, np.ndarray]]:
        """Stream positions ``[first, first+count)`` as runs ``(shard, sequence indices)`` within one shard."""
        out = []
        p, end = first, first + count
        while p < end:
            epoch, q = divmod(p, self.num_sequences)
            order, cum = self._epoch_order(epoch)
            j = int(np.searchsorted(cum, q, side="right"))  # the shard holding stream position q
            shard = int(order[j])
            n = min(end - p, int(cum[j]) - q)
            local = q - (int(cum[j]) - int(self.shard_seqs[shard])) + np.arange(n)
            if self.shuffle:
                local = self._seq_perm(epoch, shard)[local]
            out.append((shard, local))
            p += n
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: ``x, y`` int64 ``(B, T)``, ``y`` = ``x`` shifted by one."""
        B, T = self.B, self.T
        runs = [self._rows(shard)[seqs] for shard, seqs in self._segments(self._consumed + self.rank * B, B)]
        rows = runs[0] if len(runs) == 1 else np.concatenate(runs)  # (B, T+1) uint16, gathered from the maps
        xy = torch.empty((2, B, T), dtype=torch.int64, pin_memory=self._pin)  # x and y in one allocation
        xy_np = xy.numpy()
        xy_np[0] = rows[:, :-1]  # uint16 -> int64 during the copy
        xy_np[1] = rows[:, 1:]
        self._consumed += self.world_size * B
        if self.device.type != "cpu":
            xy = xy.to(self.device, non_blocking=self._pin)  # one host-to-device copy
        x, y = xy[0], xy[1]  # each (B, T), contiguous
        return x, y

    def __iter__(self):
        while True:
            yield self.next_batch()

    # ---- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data, identical on every rank."""
        return {
            "version": _STATE_VERSION,
            "consumed_sequences": int(self._consumed),
            "split": self.split,
            "seq_len": self.T,
            "global_batch_seqs": self.global_batch_seqs,
            "micro_batch_size": self.B,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shards": [[f.name, int(n)] for f, n in zip(self.files, self.shard_tokens)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken. The data, seed, shuffle, seq_len and global
        batch must match; world size and micro-batch may change, but only at a step boundary."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"loader state: version {state.get('version')!r}, expected {_STATE_VERSION}")
        mine = self.state_dict()
        for key in ("split", "seq_len", "global_batch_seqs", "seed", "shuffle", "shards"):
            if state.get(key) != mine[key]:
                theirs = state.get(key)
                if key == "shards":
                    theirs, mine_v = f"{len(theirs or [])} shards", f"{len(mine[key])} shards in {self.data_dir}"
                else:
                    mine_v = mine[key]
                raise ValueError(
                    f"loader state: '{key}' was {theirs} at save time but is {mine_v} now; resume with the "
                    "same data and settings (or start a fresh run)"
                )
        consumed = int(state["consumed_sequences"])
        same_layout = (state["world_size"], state["micro_batch_size"]) == (self.world_size, self.B)
        if not same_layout and consumed % self.global_batch_seqs:
            raise ValueError(
                f"loader state: saved mid-step (sequence {consumed}) with world_size={state['world_size']}, "
                f"micro_batch_size={state['micro_batch_size']}; a different layout "
                f"({self.world_size}, {self.B}) can resume only at a step boundary"
            )
        self._consumed = consumed
