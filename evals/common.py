"""Helpers shared by the evaluators: precision, process-group reductions, train/eval mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere (CPU scoring stays fp32, bit-comparable)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` reduced over the process group (``op`` 'sum' or 'max'); ``t`` itself without one.
    gloo reduces on CPU, nccl on the current CUDA device; the result is on ``t``'s device."""
    if dist_world() == 1:
        return t
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    if dist.get_backend() == "nccl":
        buf = t.to(torch.device("cuda", torch.cuda.current_device()))
    else:
        buf = t.cpu().clone()
    dist.all_reduce(buf, op=reduce_op)
    return buf.to(t.device)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model.eval()`` for the block, then the train/eval mode it had before."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
