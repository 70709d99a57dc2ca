"""Helpers shared by the evaluators: precision and train/eval mode. Reductions over ranks go
through ``pretrain.dist.all_reduce``; the LM head through the model's own methods
(``GPT.hidden_states``, ``GPT.token_logprobs``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere (CPU scoring stays fp32, bit-comparable)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model.eval()`` for the block, then the train/eval mode it had before."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
