"""What a checkpoint holds: plain data only (so every load is ``weights_only``), RNG states in
that form, and parameter names without DDP's / torch.compile's prefixes."""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.checkpoint.layout import CheckpointError

_PREFIXES = ("module.", "_orig_mod.")


def capture_rng_state() -> dict[str, Any]:
    """This process's Python / NumPy / torch (CPU and CUDA) RNG states as plain data
    (tensors, ints, floats, lists, tuples), so ``torch.load(weights_only=True)`` can read them."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),  # (624,) uint32 values
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:  # a different GPU count: restore the devices both runs have
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


def _strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop DDP's ``module.`` and torch.compile's ``_orig_mod.`` from parameter names."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p) :], True
        out[key] = value
    return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers (their names carry prefixes)."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


_PLAIN_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def _check_plain(obj: Any, where: str) -> None:
    """Raise if ``obj`` holds anything ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, _PLAIN_SCALARS) or isinstance(obj, (torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise CheckpointError(f"{where} has a key {k!r} of type {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    hint = " (use torch.from_numpy / .tolist(); checkpoint.capture_rng_state() does this for RNG states)"
    raise CheckpointError(
        f"{where} is a {type(obj).__module__}.{type(obj).__name__}; checkpoints hold plain data only "
        f"(tensors, numbers, strings, lists, tuples, dicts){hint if 'numpy' in type(obj).__module__ else ''}"
    )


def _to_cpu(obj: Any, memo: dict | None = None) -> Any:
    """A deep copy with every tensor copied to CPU; tensors sharing memory (tied weights) stay shared."""
    if memo is None:
        memo = {}
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key not in memo:
            memo[key] = t.to("cpu", copy=True)
        return memo[key]
    if isinstance(obj, dict):
        return type(obj)((k, _to_cpu(v, memo)) for k, v in obj.items()) if type(obj) is not dict else {
            k: _to_cpu(v, memo) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_to_cpu(v, memo) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v, memo) for v in obj)
    return copy.deepcopy(obj)


def _config_dict(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    raise CheckpointError(
        f"config must be a dict, a dataclass or have to_dict(), got {type(config).__name__}"
    )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool, type(None))):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)
