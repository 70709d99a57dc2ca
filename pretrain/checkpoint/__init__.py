"""Checkpoints: save, discover, load; atomic commit; keep the last K.

A checkpoint is one directory per optimizer step::

    checkpoints/
      step_00001000/            complete: COMMITTED + manifest.json present
        model.pt                rank 0, not FSDP: model.state_dict() (no module./_orig_mod. prefix)
        optim.pt                rank 0, not FSDP: optimizer.state_dict()
        dcp/                    FSDP2 only: torch.distributed.checkpoint shards of {"model", "optim"}
          .metadata, __0_0.distcp, __1_0.distcp, ...
        rank_0.pt, rank_1.pt    every rank: its rank_state (RNG states)
        trainer_state.pt        rank 0: step, tokens seen, loader state, counters
        config.yaml, config.json  rank 0: the resolved run config
        manifest.json           rank 0: sha256 + size of every file above
        COMMITTED               written last
      step_00002000.tmp/        a save in progress (or a crashed one: removed by the next save)

The package, one concern per module (each reads on its own):

    layout.py        names, discovery (``latest()``), manifest.json and its sha256 verification
                     (through ``data_pipeline.integrity``, the helper the token shards use too)
    state.py         what a checkpoint holds: plain data only; RNG states; unprefixed parameter names
    commit.py        the commit protocol (its docstring says why a half-written one is never loaded)
    writing.py       one rank's files, in the foreground or on a background thread (async saves)
    retention.py     keep the last K; clear what crashed saves left
    unpickle.py      restricted unpickling: weights_only loads, DCP metadata and load planner
    load.py          load into a model / optimizer; ``load_model_state`` for export / eval / generate
    checkpointer.py  ``Checkpointer``: ties them together and runs the agreements between ranks

``ckpt_dir`` must be on a filesystem all ranks share (rank 0 hashes the other ranks' files).
All loads use ``torch.load(weights_only=True)`` (DCP's pickled metadata goes through a restricted
unpickler), so a checkpoint cannot run code on load; ``rank_state`` / ``trainer_state`` must be
plain data (``capture_rng_state()`` / ``restore_rng_state()`` give the RNG states in that form).
``load_model_state(path)`` returns the full model state dict and the run config from any
checkpoint, FSDP ones included, in one process without a process group (export, eval, generate).
"""

from pretrain.checkpoint.checkpointer import Checkpointer
from pretrain.checkpoint.layout import COMMITTED, FORMAT_VERSION, MANIFEST, CheckpointError
from pretrain.checkpoint.load import load_model_state, verify_model_state
from pretrain.checkpoint.state import capture_rng_state, restore_rng_state

__all__ = [
    "Checkpointer",
    "CheckpointError",
    "capture_rng_state",
    "restore_rng_state",
    "load_model_state",
    "verify_model_state",
    "COMMITTED",
    "FORMAT_VERSION",
    "MANIFEST",
]
