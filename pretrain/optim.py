"""Parameter groups, AdamW, the learning-rate schedule and gradient clipping.

The schedule is a pure function of the optimizer step (``lr_at``), so a resumed run needs no
scheduler state: the step alone sets the learning rate.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def lr_at(step: int, max_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup_steps``
    (step 0 gets max_lr / warmup_steps, never 0), then a cosine from ``max_lr`` down to
    ``min_lr_ratio * max_lr`` at ``max_steps``; constant at the minimum afterwards."""
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    decay_steps = max_steps - warmup_steps
    progress = (step - warmup_steps) / decay_steps  # in [0, 1)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on >=2-D tensors (matmul weights, embeddings), none on
    biases and LayerNorm gains. ``named_parameters`` yields a tied weight once."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, lr: float, betas, eps: float, weight_decay: float, fused: bool | None, device: torch.device
) -> torch.optim.AdamW:
    if fused is None:  # the fused kernel (one pass over each tensor) exists for CUDA and CPU
        fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=fused
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm (over all ranks for FSDP's sharded DTensor gradients), and clip
    to ``max_norm`` when it is > 0. Returns the norm before clipping as a plain tensor."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, error_if_nonfinite=False)
    if hasattr(total, "full_tensor"):  # a DTensor: the partial norms of each shard, reduced here
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
