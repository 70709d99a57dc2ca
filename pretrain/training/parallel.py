"""The only code that wraps the model. The model stays a plain ``nn.Module``; this applies,
in this order:

1. activation checkpointing (optional): each transformer block recomputes its activations
   in backward;
2. for ``ddp``: ``torch.compile`` of the whole model (flag), then ``DistributedDataParallel``
   (DDP's bucketing hooks stay outside the compiled graph, as the PyTorch docs recommend);
3. for ``fsdp``: ``torch.compile`` of each block (flag), then FSDP2 ``fully_shard`` on each
   block and at the root, with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``
   on CUDA in bf16 (fp32 on CPU). Compiling per block before sharding is torchtitan's order
   (``models/llama3/infra/parallelize.py``): compiling the root over FSDP2's pre/post-forward
   hooks graph-breaks at every block, while compiled blocks are traced once and reused.

Compilation is in place (``nn.Module.compile``), so ``Wrapped`` keeps: ``module`` — the
original module object, whose ``state_dict`` has no ``_orig_mod.`` / ``module.`` prefixes
(checkpoints, exports) and which is also what evals call (compiled, without DDP; for FSDP
the root, since every rank takes part in its all-gathers); ``train_model`` — what the
training step calls (the DDP wrapper, or the module itself).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn


def uses_mp_policy(mode: str, device: torch.device, dtype: str) -> bool:
    """FSDP2 on CUDA in bf16 casts the parameters to bf16 itself (``MixedPrecisionPolicy``)."""
    return mode == "fsdp" and device.type == "cuda" and dtype == "bf16"


def training_autocast(device: torch.device, dtype: str, mp_policy: bool):
    """The training step's precision (``train.dtype``): bf16 autocast, unless FSDP's
    mixed-precision policy already computes in bf16; nothing for fp32."""
    if dtype == "bf16" and not mp_policy:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Wrapped:
    module: nn.Module
    train_model: nn.Module
    mode: str  # "single" | "ddp" | "fsdp"
    device: torch.device
    dtype: str = "fp32"
    uses_mp_policy: bool = False
    """FSDP casts parameters to bf16 itself, so no autocast is needed."""

    def autocast(self):
        """The precision of the training forward (:func:`training_autocast`)."""
        return training_autocast(self.device, self.dtype, self.uses_mp_policy)

    @property
    def eval_model(self) -> nn.Module:
        return self.module

    @property
    def fsdp(self) -> bool:
        return self.mode == "fsdp"

    def sync_context(self, last_micro_step: bool):
        """Gradients are reduced across ranks only on the last micro-step of a step."""
        if self.mode == "ddp" and not last_micro_step:
            return self.train_model.no_sync()
        if self.mode == "fsdp":
            self.train_model.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()


def apply_activation_checkpointing(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    blocks = model.transformer.h
    for i, block in enumerate(blocks):
        blocks[i] = checkpoint_wrapper(block, preserve_rng_state=True)


def wrap_model(
    model: nn.Module,
    mode: str,
    device: torch.device,
    distributed: bool,
    compile: bool = False,
    dtype: str = "fp32",
    activation_checkpointing: bool = False,
) -> Wrapped:
    """Wrap ``model`` (already on ``device``) for training; see the module docstring."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)

    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if compile:
            for block in model.transformer.h:
                block.compile()  # in place: no `_orig_mod.` in parameter names
        mp = uses_mp_policy(mode, device, dtype)
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if mp
            else MixedPrecisionPolicy()
        )
        for block in model.transformer.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return Wrapped(model, model, "fsdp", device, dtype, uses_mp_policy=mp)

    if compile:
        model.compile()  # in place: the module (and its state_dict keys) stay the same object
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return Wrapped(model, DDP(model, device_ids=ids), "ddp", device, dtype)
    return Wrapped(model, model, "single", device, dtype)
