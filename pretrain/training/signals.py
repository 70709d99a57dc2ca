"""Stopping a run between two steps: preemption (SIGTERM / SIGUSR1) and Ctrl-C (SIGINT).

A signal only sets a flag (:class:`StopRequest`); the trainer folds the flag into the one
all-reduce of its step, so every rank sees the stop at the same step, finishes it, saves it and
returns :attr:`StopRequest.code`: ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL) for launchers to requeue on,
or ``EXIT_INTERRUPTED`` (130) after a Ctrl-C. A second Ctrl-C raises ``KeyboardInterrupt`` at once
(the newest checkpoint stays).
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from typing import Any

EXIT_OK = 0
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): "try again later" -- a requeue-able stop
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")
INTERRUPT_SIGNALS = ("SIGINT",)  # Ctrl-C: the same graceful stop, exit 130; a second one aborts at once
# A terminal's Ctrl-C reaches a torchrun worker twice within milliseconds (from the tty, and
# forwarded by torchrun): only a repeat this much later is a person's second Ctrl-C.
INTERRUPT_REPEAT_S = 1.0


class StopRequest:
    """The stop flag of one process. ``install()`` / ``restore()`` the handlers around the loop;
    ``next_step()`` names the step being finished in the message a signal prints."""

    def __init__(self, rank: int, next_step: Callable[[], int]) -> None:
        self.rank, self.next_step = rank, next_step
        self.signal: str | None = None  # the first signal's name, once one arrived
        self._time = 0.0
        self._prev: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def agreed(self, what: str) -> bool:
        """Whether any rank has a stop request (a collective: every rank calls it together)."""
        import torch

        from pretrain import dist

        return bool(dist.all_reduce(torch.tensor([float(self.requested)]), what, op="max").item())

    @property
    def code(self) -> int:
        """The exit code of the stop (a stop seen on another rank counts as a preemption)."""
        return EXIT_INTERRUPTED if self.signal in INTERRUPT_SIGNALS else EXIT_PREEMPTED

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if (name in INTERRUPT_SIGNALS and self.signal in INTERRUPT_SIGNALS
                and time.monotonic() - self._time > INTERRUPT_REPEAT_S):
            raise KeyboardInterrupt  # a second Ctrl-C: abort at once (the newest checkpoint stays)
        if self.signal is None:
            self.signal, self._time = name, time.monotonic()
            again = " (Ctrl-C again to abort at once)" if name in INTERRUPT_SIGNALS else ""
            print(f"[rank {self.rank}] {name}: finishing step {self.next_step()}, then checkpoint and exit "
                  f"{self.code}{again}", file=sys.stderr, flush=True)

    def install(self) -> None:
        for name in PREEMPT_SIGNALS + INTERRUPT_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._prev[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._prev.items():
            signal.signal(sig, handler)
        self._prev.clear()
