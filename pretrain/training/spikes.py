"""Loss spikes: :class:`LossSpikeDetector` decides whether to skip an optimizer update whose loss
(or gradient norm) is far above its recent history; see its docstring. Its decision is all-reduced
through ``pretrain.dist`` so every rank takes the same one."""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import torch

from pretrain import dist


class LossSpikeError(RuntimeError):
    """The detector skipped too many consecutive updates: the run diverged or the data changed."""


class LossSpikeDetector:
    """Decide, before the optimizer step, whether to skip an update whose loss or gradient norm
    is far above its recent history.

    A value ``x`` of a tracked metric (``loss``, and ``grad_norm`` when given) is a spike when the
    window holds at least ``warmup`` accepted values and::

        x > mean + threshold * max(std, min_rel_std * |mean|)      (z-score rule)
        or, if ratio is set,  x > ratio * median                   (ratio rule)

    over the last ``window`` *accepted* finite values (a skipped value never enters the window,
    so one spike cannot raise the bar for the next). A non-finite value is always a spike, even
    during warm-up. ``max_consecutive`` skips in a row raise :class:`LossSpikeError` instead of
    silently skipping forever (the loss may have moved for good: restart from a checkpoint with a
    lower LR, or raise the threshold).

    Every rank must take the same decision or DDP/FSDP deadlock or diverge: feed :meth:`update`
    the *all-reduced* loss and grad norm (then every rank computes the same thing), and it also
    all-reduces the decision (MAX) when a process group is up, so one rank that sees a spike makes
    all skip. The window survives a checkpoint through :meth:`state_dict` / :meth:`load_state_dict`
    (store it in the checkpoint's trainer_state: it is identical on every rank).
    """

    def __init__(
        self,
        window: int = 100,
        threshold: float = 6.0,
        warmup: int | None = None,
        ratio: float | None = None,
        min_rel_std: float = 0.01,
        max_consecutive: int = 20,
        track_grad_norm: bool = True,
    ) -> None:
        if not isinstance(window, int) or window < 2:
            raise ValueError(f"LossSpikeDetector: window must be an int >= 2, got {window!r}")
        warmup = window if warmup is None else warmup
        if not isinstance(warmup, int) or not 2 <= warmup <= window:
            raise ValueError(f"LossSpikeDetector: warmup must be an int in [2, window={window}], got {warmup!r}")
        if not threshold > 0:
            raise ValueError(f"LossSpikeDetector: threshold (std multiples) must be > 0, got {threshold!r}")
        if ratio is not None and not ratio > 1:
            raise ValueError(f"LossSpikeDetector: ratio must be > 1 (or None to disable), got {ratio!r}")
        if not min_rel_std >= 0:
            raise ValueError(f"LossSpikeDetector: min_rel_std must be >= 0, got {min_rel_std!r}")
        if not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"LossSpikeDetector: max_consecutive must be an int >= 1, got {max_consecutive!r}")
        self.window, self.threshold, self.warmup, self.ratio = window, float(threshold), warmup, ratio
        self.min_rel_std, self.max_consecutive = float(min_rel_std), max_consecutive
        self.track_grad_norm = bool(track_grad_norm)
        self._hist: dict[str, deque[float]] = {"loss": deque(maxlen=window), "grad_norm": deque(maxlen=window)}
        self.skipped = 0  # total skipped updates
        self.consecutive = 0  # skipped updates in a row
        self.last_reason = ""

    # ---- the decision ------------------------------------------------------------------------------
    def _spike_reason(self, name: str, x: float) -> str:
        if not math.isfinite(x):
            return f"{name}={x} is not finite"
        hist = self._hist[name]
        if len(hist) < self.warmup:
            return ""
        mean = math.fsum(hist) / len(hist)
        std = statistics.pstdev(hist, mu=mean)
        bar = mean + self.threshold * max(std, self.min_rel_std * abs(mean))
        if x > bar:
            return f"{name}={x:.6g} > mean {mean:.6g} + {self.threshold:g} std ({bar:.6g}) over {len(hist)} steps"
        if self.ratio is not None:
            med = statistics.median(hist)
            if x > self.ratio * med:
                return f"{name}={x:.6g} > {self.ratio:g} x median {med:.6g} over {len(hist)} steps"
        return ""

    def update(self, loss: float | torch.Tensor, grad_norm: float | torch.Tensor | None = None,
               group: Any = None) -> bool:
        """Return True to SKIP this update (a spike), False to apply it; accepted values join the
        window. Pass the all-reduced loss / grad norm; the decision is all-reduced too."""
        values = {"loss": float(loss)}
        if self.track_grad_norm and grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        reasons = [r for r in (self._spike_reason(k, v) for k, v in values.items()) if r]
        skip = bool(reasons)
        if dist.group_up():  # one rank's spike is every rank's spike
            flag = torch.tensor([1.0 if skip else 0.0])
            dist.all_reduce(flag, "spike_decision", op="max", group=group)
            if flag.item() > 0 and not skip:
                reasons = ["another rank saw a spike"]
            skip = flag.item() > 0
        if skip:
            self.skipped += 1
            self.consecutive += 1
            self.last_reason = "; ".join(reasons)
            if self.consecutive >= self.max_consecutive:
                raise LossSpikeError(
                    f"LossSpikeDetector: {self.consecutive} consecutive updates skipped (last: {self.last_reason}); "
                    "the run is diverging or the data changed: resume from an earlier checkpoint with a lower "
                    "LR, or raise train.spike_threshold / disable train.spike_detection"
                )
            return True
        self.consecutive = 0
        self.last_reason = ""
        for k, v in values.items():
            self._hist[k].append(v)
        return False

    # ---- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data (identical on every rank when fed all-reduced values)."""
        return {
            "window": self.window,
            "loss": list(self._hist["loss"]),
            "grad_norm": list(self._hist["grad_norm"]),
            "skipped": self.skipped,
            "consecutive": self.consecutive,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("loss", "grad_norm", "skipped", "consecutive"):
            if key not in state:
                raise ValueError(f"LossSpikeDetector.load_state_dict: missing key '{key}'; not a detector state")
        for name in ("loss", "grad_norm"):
            # A changed window keeps the newest values (deque maxlen), so the resume is still sound.
            self._hist[name] = deque((float(v) for v in state[name]), maxlen=self.window)
        self.skipped = int(state["skipped"])
        self.consecutive = int(state["consecutive"])
