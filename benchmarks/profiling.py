"""Instruments for the hot path: host-device syncs, compiled-graph breaks, a profiler summary.

Used by ``benchmarks/gpu_check.py``, ``benchmarks/generate.py`` and the readiness tests; the product
never imports it.

Host syncs. A CUDA step should hand the GPU its work and never wait for it, except where a
value must reach Python (the trainer's one ``tolist()`` of the all-reduced step flags). Two
ways to count the waits, one per device:

- CUDA: ``torch.cuda.set_sync_debug_mode("warn")`` makes PyTorch warn at every synchronizing
  CUDA call (``cudaStreamSynchronize``, device-to-host copies, ``.item()``, ``nonzero()``, ...);
  the warnings are counted.
- CPU, where nothing synchronizes: a ``TorchFunctionMode`` counts the tensor methods that *would*
  synchronize on a GPU (``item``, ``tolist``, ``__bool__``, ``__float__``, ``cpu``, ``nonzero``,
  ...) when the training step's own code (``pretrain/``) calls them, with the call sites. Run it
  on an eager model: it sees every such call made by the step's Python code.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

import pretrain.training

# Tensor methods / functions whose result needs the device's data on the host: each is a sync
# on CUDA (the data-dependent-shape ops too: the host must learn the output's size).
SYNCING_METHODS = frozenset({
    "item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__complex__",
    "nonzero", "masked_select", "unique", "unique_consecutive", "repeat_interleave",
})


_PLUMBING = {os.path.join(os.path.dirname(torch.__file__), f) for f in ("overrides.py", "_tensor.py")}
_PRETRAIN_DIR = os.path.dirname(os.path.abspath(pretrain.training.__file__))  # the training step's code


class _SyncingCallCounter(TorchFunctionMode):
    """Counts the syncing calls made by the training step's own code (``pretrain/``): the direct
    caller must be a file of ``pretrain/``. Calls inside torch are left out because
    on CPU they cannot be told apart from host-only work that never syncs on a GPU (the optimizer's
    per-parameter step counters live on the host there); so is the data loader, which fills host
    buffers by design and sends each batch with one non-blocking copy."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING_METHODS:
            f = sys._getframe(1)  # skip the dispatch plumbing (Tensor.__float__ -> handle_torch_function)
            while f is not None and f.f_code.co_filename in _PLUMBING:
                f = f.f_back
            if f is not None and f.f_code.co_filename.startswith(_PRETRAIN_DIR):
                self.calls[f"{name} at {os.path.basename(f.f_code.co_filename)}:{f.f_lineno}"] += 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """``with HostSyncCounter(device) as c: ...`` then ``c.count`` (and ``c.calls`` on CPU:
    which methods). See the module docstring for what is counted on each device."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.count = 0
        self.calls: Counter[str] = Counter()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> HostSyncCounter:
        if self.device.type == "cuda":
            self._caught = self._stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            torch.cuda.synchronize(self.device)
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._mode = self._stack.enter_context(_SyncingCallCounter())
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            hits = [str(w.message) for w in self._caught if "called a synchronizing CUDA operation" in str(w.message)]
            self.count = len(hits)  # (not the one-time "sync debug mode is a prototype" notice)
            self.calls = Counter(h.split("\n")[0][:120] for h in hits)
        else:
            self.calls = Counter(self._mode.calls)
            self.count = sum(self.calls.values())
        self._stack.close()


def graph_breaks() -> dict[str, int]:
    """``torch._dynamo``'s counters so far: graph breaks (with their reasons) and unique graphs."""
    from torch._dynamo.utils import counters

    breaks = dict(counters["graph_break"])
    return {"graph_breaks": int(sum(breaks.values())), "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "break_reasons": {k[:160]: int(v) for k, v in breaks.items()}}


@contextlib.contextmanager
def reset_dynamo_counters() -> Iterator[None]:
    from torch._dynamo.utils import counters

    counters.clear()
    yield


def profile_summary(fn, device: torch.device, top: int = 15, host: bool = False) -> dict:
    """Run ``fn()`` once under ``torch.profiler`` and summarise where the time went: the ``top``
    kernels by device time (CUDA) or operators by self CPU time, each with its share, the total,
    and the wall time (on CUDA the gap between them is time the GPU sat idle). ``host=True``
    ranks operators by self CPU time on a GPU too: where the host's time goes."""
    import time

    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    cuda = on_gpu and not host  # host=True: rank by self CPU time even on a GPU (host overhead)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        if on_gpu:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()

    def self_time(e) -> float:  # microseconds
        if cuda:
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0))
        return float(e.self_cpu_time_total)

    if cuda:  # kernels and copies only: an operator's device time is its kernels' time again
        from torch.autograd import DeviceType

        events = [e for e in events if e.device_type == DeviceType.CUDA]
    rows = sorted(events, key=self_time, reverse=True)
    total = sum(self_time(e) for e in events)
    return {
        "by": "self device time" if cuda else "self CPU time",
        "wall_ms": round(1000 * wall, 2),
        "total_ms": round(total / 1000, 2),
        "top": [{"name": e.key[:100], "ms": round(self_time(e) / 1000, 3), "calls": int(e.count),
                 "share": round(self_time(e) / total, 4) if total else 0.0} for e in rows[:top]],
        "flash_attention": any("flash" in e.key.lower() for e in events),
    }
