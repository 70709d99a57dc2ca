"""Helpers shared by the evaluators: precision and train/eval mode. Reductions over ranks go
through ``pretrain.dist.all_reduce``; the LM head through the model's own methods
(``GPT.hidden_states``, ``GPT.token_logprobs``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from pretrain import dist


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere (CPU scoring stays fp32, bit-comparable)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def stop_check(model, stop: Callable[[], bool] | None) -> Callable[[], bool]:
    """An evaluator's check between batches for a requested stop (Ctrl-C, preemption; the trainer
    passes ``stop``): agreed between the ranks when ``model`` is FSDP-sharded (its forwards are
    collective, so every rank must leave at the same batch: one tiny all-reduce per batch); this
    rank's own flag otherwise (the evaluator's only collective is its final reduction, which also
    carries whether any rank stopped early: then no rank reports the partial result)."""
    if stop is None:
        return lambda: False
    if not dist.is_fsdp(model):
        return stop
    return lambda: bool(dist.all_reduce(torch.tensor([float(stop())]), "eval stop flag", op="max").item())


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model.eval()`` for the block, then the train/eval mode it had before."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
