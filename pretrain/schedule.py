"""The training recipe's names and schedules: the optimizer and schedule names the config
accepts, and the learning-rate and batch-size schedules as pure functions of the optimizer step
(``lr_at``, ``batch_tokens_at``), so a resumed run needs no scheduler state: the step alone sets
the learning rate and the batch. A leaf: it imports nothing of the project (the config, the run
plan and the optimizers all read it).
"""

from __future__ import annotations

import math

# The names the config accepts (pretrain/config.py reads them from here).
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
COOLDOWNS = ("linear", "1-sqrt")
MUON_ADJUST_LR = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn
NS_DTYPE_NAMES = ("bf16", "fp32")  # Muon's Newton-Schulz dtype (training/optim.py: NS_DTYPES)


def cooldown_start(max_steps: int, cooldown_frac: float) -> int:
    """First step of the wsd cool-down: the last ``round(cooldown_frac * max_steps)`` steps decay."""
    return max_steps - round(cooldown_frac * max_steps)


def lr_at(step: int, max_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float,
          name: str = "cosine", cooldown_frac: float = 0.2, cooldown: str = "linear") -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup_steps``
    (step 0 gets max_lr / warmup_steps, never 0), then down to ``min_lr_ratio * max_lr`` at
    ``max_steps``; constant at the minimum afterwards. The way down is ``name``:

    - ``cosine``: a half cosine over all the steps after the warmup;
    - ``wsd`` (warmup-stable-decay, a.k.a. trapezoidal): ``max_lr`` until the last
      ``cooldown_frac`` of ``max_steps``, then a ``linear`` or ``1-sqrt`` cool-down
      (1 - sqrt(progress): Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
      Beyond Fixed Training Durations", found it beats linear at equal length)::

          lr |   ________________
             |  /                \\__         1-sqrt drops fast, then flattens
             | /                    \\__
             +----------------------------- step
              warmup   stable      cool-down
    """
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    if name == "wsd":
        start = max(cooldown_start(max_steps, cooldown_frac), warmup_steps)
        if step < start:
            return max_lr
        progress = (step - start) / (max_steps - start)  # in [0, 1)
        coeff = 1.0 - progress if cooldown == "linear" else 1.0 - math.sqrt(progress)  # 1 -> 0
        return min_lr + coeff * (max_lr - min_lr)
    if name != "cosine":
        raise ValueError(f"schedule.name={name!r} must be one of {', '.join(SCHEDULES)}")
    decay_steps = max_steps - warmup_steps
    progress = (step - warmup_steps) / decay_steps  # in [0, 1)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


def batch_tokens_at(step: int, global_batch_tokens: int, start_tokens: int, warmup_steps: int) -> int:
    """Global batch (tokens) of optimizer step ``step``: with a batch-size warmup
    (``warmup_steps > 0``) it starts at ``start_tokens`` and grows in whole multiples of it,
    linearly in the step, reaching ``global_batch_tokens`` at ``warmup_steps``::

        batch(s) = start * (1 + floor((G / start - 1) * s / warmup_steps))   for s < warmup_steps

    Every batch is a multiple of ``start_tokens``, so each is a whole number of micro-steps and
    the loader's stream (which only counts sequences) stays the same on any world size."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return global_batch_tokens
    units = global_batch_tokens // start_tokens
    return start_tokens * (1 + (units - 1) * step // warmup_steps)


def tokens_before(step: int, global_batch_tokens: int, start_tokens: int, warmup_steps: int) -> int:
    """Tokens consumed by steps ``0 .. step-1`` (closed form after the warmup)."""
    n = min(step, max(warmup_steps, 0))
    warm = sum(batch_tokens_at(s, global_batch_tokens, start_tokens, warmup_steps) for s in range(n))
    return warm + (step - n) * global_batch_tokens
