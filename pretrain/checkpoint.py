"""Checkpoints: save, discover, load; atomic commit; keep the last K.

A checkpoint is one directory per optimizer step::

    checkpoints/
      step_00001000/            complete: COMMITTED + manifest.json present
        model.pt                rank 0, not FSDP: model.state_dict() (no module./_orig_mod. prefix)
        optim.pt                rank 0, not FSDP: optimizer.state_dict()
        dcp/                    FSDP2 only: torch.distributed.checkpoint shards of {"model", "optim"}
          .metadata, __0_0.distcp, __1_0.distcp, ...
        rank_0.pt, rank_1.pt    every rank: its rank_state (RNG states)
        trainer_state.pt        rank 0: step, tokens seen, loader state, counters
        config.yaml, config.json  rank 0: the resolved run config
        manifest.json           rank 0: sha256 + size of every file above
        COMMITTED               written last
      step_00002000.tmp/        a save in progress (or a crashed one: removed by the next save)

Commit protocol (why a half-written checkpoint is never picked up):
  1. every rank gathers its state; rank 0 removes what crashed saves left (``*.tmp`` dirs, step
     dirs without COMMITTED) and creates a fresh ``step_N.tmp/``; the ranks agree (all-reduce).
  2. every rank writes its files into it, each fsynced; the ranks agree (all-reduce) that all succeeded.
  3. rank 0 hashes every file (DCP's shards included: DCP has no checksums of its own), writes
     manifest.json, renames ``step_N.tmp`` -> ``step_N`` (an existing ``step_N`` is first renamed
     aside to ``step_N.replaced`` and deleted after), fsyncs the parent, writes COMMITTED.
  4. rank 0 deletes complete checkpoints older than the newest ``keep_last`` (failures only warn).
``latest()`` only returns directories named exactly ``step_XXXXXXXX`` holding COMMITTED and a
valid manifest.json (or ``step_N.replaced``, if a re-save of step N was killed between its two
renames). Deleting a checkpoint removes its COMMITTED marker first, so a half-deleted one is
never loaded either.

Failures: any error while saving (ENOSPC, permission, a bad ``rank_state``) removes the tmp dir and
raises :class:`CheckpointError` on every rank, naming the directory and the last intact checkpoint.
The trainer should catch it, log it and stop (exit non-zero): the previous checkpoint is intact,
and training on without checkpoints would risk losing far more work than the stop costs.

Async saves (``async_save=True``): ``save()`` copies the state to CPU (so the caller may mutate
parameters as soon as it returns), then writes on a background thread. At most one save is in
flight: a new ``save()`` first waits for the previous one. Errors of a background save are raised
by the next ``save()``/``wait()``. With one process the background thread also commits. With
several processes each rank writes its files in its thread and the *commit* (the agreement
all-reduce and rank 0's rename) happens in the next ``save()`` or ``wait()`` on the main thread,
so no collective runs on a background thread on the training process group (FSDP's DCP shards
are written by ``dcp.async_save`` on a dedicated gloo group). So with several ranks, call
``wait()`` (collectively) before exiting, or the last async checkpoint stays uncommitted.

``ckpt_dir`` must be on a filesystem all ranks share (rank 0 hashes the other ranks' files).
All loads use ``torch.load(weights_only=True)`` (DCP's pickled metadata goes through a restricted
unpickler), so a checkpoint cannot run code on load; ``rank_state`` / ``trainer_state`` must be
plain data (``capture_rng_state()`` / ``restore_rng_state()`` give the RNG states in that form).
``load_model_state(path)`` returns the full model state dict and the run config from any
checkpoint, FSDP ones included, in one process without a process group (export, eval, generate).
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import errno
import hashlib
import json
import logging
import os
import pathlib
import pickle
import random
import re
import shutil
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from pretrain import guards

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COMMITTED = "COMMITTED"
_STEP_RE = re.compile(r"^step_(\d{8})$")
_REPLACED_RE = re.compile(r"^step_(\d{8})\.replaced$")
_TMP_RE = re.compile(r"^step_(\d{8})\.tmp$")
_PREFIXES = ("module.", "_orig_mod.")
_CORRUPT_HINT = "the checkpoint is corrupt — resume from an earlier one with --resume PATH"


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded. The message names the file and what to do."""


# ----------------------------------------------------------------------------- RNG state helpers


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


# ----------------------------------------------------------------------------- file helpers


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _sha256_many(paths: list[Path]) -> list[tuple[str, int]]:
    """(sha256, size) of each file, hashed on a few threads (hashlib releases the GIL)."""
    workers = min(8, len(paths), os.cpu_count() or 1)
    if workers <= 1:
        return [_sha256(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ckpt-sha256") as pool:
        return list(pool.map(_sha256, paths))


def _rmtree_quiet(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove %s: %s", path, e)


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


def _safe_torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint file {path} holds objects other than tensors and plain data, so it was refused "
            f"(weights_only load: {first}); it was not written by this Checkpointer — never load "
            f"checkpoints from untrusted sources"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint file {path} could not be read ({e}); {_CORRUPT_HINT}") from e


# ----------------------------------------------------------------------------- manifest + verification


def _is_complete(path: Path) -> bool:
    if not (path / COMMITTED).is_file():
        return False
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)


def _complete_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found: dict[int, Path] = {}
    replaced: dict[int, Path] = {}
    for entry in ckpt_dir.iterdir():
        if (m := _STEP_RE.match(entry.name)) and entry.is_dir() and _is_complete(entry):
            found[int(m.group(1))] = entry
        elif (m := _REPLACED_RE.match(entry.name)) and entry.is_dir() and _is_complete(entry):
            replaced[int(m.group(1))] = entry
    # A crash between "rename old aside" and "rename new in" while re-saving a step leaves only
    # step_N.replaced: it is still a complete checkpoint, so it still counts.
    for step, path in replaced.items():
        found.setdefault(step, path)
    return sorted(found.items())


def _read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} does not exist or is not a directory; pass --resume auto, none or the "
            f"path of a step_XXXXXXXX directory"
        )
    if not (path / COMMITTED).is_file():
        raise CheckpointError(
            f"checkpoint {path} has no {COMMITTED} marker: it is incomplete (a crashed save); "
            f"resume from an earlier one with --resume PATH"
        )
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path / MANIFEST} is missing or unreadable ({e}); {_CORRUPT_HINT}") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint file {path / MANIFEST} has no 'files' table; {_CORRUPT_HINT}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint file {path / MANIFEST} has format_version {manifest.get('format_version')!r}, "
            f"this code reads {FORMAT_VERSION}; load it with the version of the code that wrote it"
        )
    root = path.resolve()
    for name in manifest["files"]:
        _resolve_in(root, name, path)
    return manifest


def _resolve_in(root: Path, name: str, path: Path) -> Path:
    """The manifest entry ``name`` as a path inside ``root``; refuses anything that escapes it."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\\" in name:
        raise CheckpointError(f"checkpoint file {path / MANIFEST} lists an invalid file name {name!r}; refused")
    target = (root / name).resolve()
    if target != root and root not in target.parents:
        raise CheckpointError(
            f"checkpoint file {path / MANIFEST} lists {name!r}, which is outside the checkpoint "
            f"directory {path}; refused (the manifest was tampered with)"
        )
    return target


def _verify(path: Path, manifest: dict, names: list[str] | None = None) -> None:
    """Check size and sha256 of the listed files (all of them when ``names`` is None)."""
    root = path.resolve()
    files = manifest["files"]
    names = sorted(files) if names is None else names
    targets = []
    for name in names:
        if name not in files:
            raise CheckpointError(f"checkpoint {path} has no {name!r} in {MANIFEST}; {_CORRUPT_HINT}")
        target = _resolve_in(root, name, path)
        if not target.is_file():
            raise CheckpointError(f"checkpoint file {path / name} is missing; {_CORRUPT_HINT}")
        targets.append(target)
    for name, (digest, size) in zip(names, _sha256_many(targets)):
        entry = files[name]
        if size != entry.get("size") or digest != entry.get("sha256"):
            raise CheckpointError(f"checkpoint file {path / name} failed its sha256 check; {_CORRUPT_HINT}")


# ----------------------------------------------------------------------------- DCP (FSDP2) helpers


def _dcp_safe_classes() -> dict[tuple[str, str], Any]:
    """Classes DCP's pickled ``.metadata`` may reference; everything else is refused."""
    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md
    import torch.distributed.checkpoint.planner as pl

    allowed: dict[tuple[str, str], Any] = {}
    for mod in (md, fs, pl):
        for name, obj in vars(mod).items():
            if isinstance(obj, type) and obj.__module__ == mod.__name__:
                allowed[(mod.__name__, name)] = obj
    allowed[("torch", "Size")] = torch.Size
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    allowed[("builtins", "set")] = set
    allowed[("builtins", "frozenset")] = frozenset
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # name -> torch.layout
    for cls in (pathlib.PurePath, pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.PosixPath, pathlib.WindowsPath,
                pathlib.Path):
        allowed[("pathlib", cls.__name__)] = cls
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path: Path):
        super().__init__(f)
        self._allowed = _dcp_safe_classes()
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise CheckpointError(
            f"checkpoint file {self._path} references {module}.{name}, which DCP metadata never holds; "
            f"refused — never load checkpoints from untrusted sources"
        )

    def persistent_load(self, pid):  # pragma: no cover - DCP metadata has none
        raise CheckpointError(f"checkpoint file {self._path} has persistent ids; refused")


def _safe_reader(dcp_dir: Path):
    """A DCP FileSystemReader whose metadata is read by a restricted unpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            # FileSystemReader.read_metadata, minus its bare pickle.load (torch 2.11-2.14 agree on
            # the file names: ".metadata", or "__{rank}.metadata" for rank-local metadata).
            rank = kwargs.get("rank")
            meta_path = dcp_dir / (".metadata" if rank is None else f"__{rank}.metadata")
            with open(meta_path, "rb") as f:
                metadata = _MetadataUnpickler(f, meta_path).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

    return _SafeFileSystemReader(str(dcp_dir))


def _safe_load_planner():
    """DCP's default load planner, except non-tensor entries load with weights_only=True."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class _SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise CheckpointError(
                    f"DCP entry {read_item.dest_index.fqn!r} holds objects other than plain data; refused ({e})"
                ) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return _SafeLoadPlanner()


def _dcp_load(dcp_dir: Path, state: dict, reader=None, no_dist: bool = False) -> None:
    """dcp.load in place, with DCP's failures (a BaseException) turned into one CheckpointError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.load(state, storage_reader=reader or _safe_reader(dcp_dir), planner=_safe_load_planner(),
                 no_dist=no_dist)
    except CheckpointException as e:
        first = next(iter(e.failures.values()), None) if isinstance(e.failures, dict) else None
        inner = first[0] if isinstance(first, tuple) and first else first
        if isinstance(inner, CheckpointError):
            raise inner from None
        raise CheckpointError(
            f"checkpoint {dcp_dir} could not be loaded by torch.distributed.checkpoint ({inner or e}); it does "
            f"not fit this model/optimizer, or {_CORRUPT_HINT}"
        ) from None


def _dcp_full_model_state(dcp_dir: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of a DCP checkpoint, in this process, no process group."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = _safe_reader(dcp_dir)
    metadata = reader.read_metadata()
    state: dict[str, Any] = {"model": {}}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata):
            state["model"][key[len("model.") :]] = torch.empty(meta.size, dtype=meta.properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        _dcp_load(dcp_dir, state, reader=reader, no_dist=True)
    return state["model"]


def _is_enospc(err: BaseException | None, depth: int = 0) -> bool:
    """ENOSPC anywhere in ``err``: its cause chain, or the per-rank failures DCP wraps."""
    if err is None or depth > 8:
        return False
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    failures = getattr(err, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
    if isinstance(failures, dict):
        for f in failures.values():
            inner = f[0] if isinstance(f, tuple) and f else f
            if isinstance(inner, BaseException) and _is_enospc(inner, depth + 1):
                return True
    return _is_enospc(err.__cause__ or err.__context__, depth + 1)


# ----------------------------------------------------------------------------- process-group helpers


def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _collective_device() -> torch.device:
    backend = str(torch.distributed.get_backend())
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- the Checkpointer


class _Pending:
    """A save whose files are (being) written and whose commit may still be due."""

    def __init__(self, step: int, tmp: Path, final: Path):
        self.step, self.tmp, self.final = step, tmp, final
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None  # this rank's write error
        self.committed = False


class Checkpointer:
    """Saves, finds and loads checkpoints of one run (see the module docstring for the layout).

    Args:
        ckpt_dir: the run's checkpoint directory, shared by all ranks.
        keep_last: complete checkpoints to keep (>= 1); older ones are deleted after each commit.
        rank, world_size: this process's place in the job (0, 1 without torch.distributed).
        async_save: write on a background thread after a CPU copy of the state.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, keep_last: int, rank: int = 0, world_size: int = 1,
                 async_save: bool = False):
        if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
            raise CheckpointError(f"checkpoint.keep_last must be an integer >= 1, got {keep_last!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise CheckpointError(f"Checkpointer needs 0 <= rank < world_size, got rank={rank!r} world_size={world_size!r}")
        self.ckpt_dir = Path(ckpt_dir)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.async_save = bool(async_save)
        self._pending: _Pending | None = None
        self._gloo_group = None  # for dcp.async_save's background collectives

    # ------------------------------------------------------------------ discovery

    def latest(self) -> Path | None:
        """The newest complete checkpoint (COMMITTED + manifest), or None."""
        found = _complete_checkpoints(self.ckpt_dir)
        return found[-1][1] if found else None

    def _previous_note(self) -> str:
        found = _complete_checkpoints(self.ckpt_dir)
        if not found:
            return "there is no earlier complete checkpoint"
        step, path = found[-1]
        return f"the previous checkpoint step {step} ({path}) is intact"

    # ------------------------------------------------------------------ collectives

    def _all_ok(self, ok: bool, what: str = "checkpoint: every rank ok") -> bool:
        """True on every rank iff ``ok`` on every rank (an all-reduce; a no-op with one process).
        A rank that stops answering fails it with one line naming ``what`` (guards.collective)."""
        if self.world_size == 1 or not _dist_on():
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_collective_device())
        guards.all_reduce(flag, what, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _barrier(self) -> None:
        self._all_ok(True, "checkpoint: barrier")

    # ------------------------------------------------------------------ save

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             trainer_state: Mapping[str, Any], rank_state: Mapping[str, Any] | None, config: Any,
             fsdp: bool = False) -> Path:
        """Save a checkpoint of ``step`` (collective: every rank calls it). Returns its final path.

        With ``async_save`` the returned path is where it will be once committed (``wait()``)."""
        self._finish_pending()
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10**8:
            raise CheckpointError(f"checkpoint step must be an integer in [0, 1e8), got {step!r}")
        if self.world_size > 1 and not _dist_on():
            raise CheckpointError(
                f"Checkpointer(world_size={self.world_size}) needs torch.distributed initialised (the ranks "
                f"agree before committing); call init_process_group first or pass world_size=1"
            )
        final = self.ckpt_dir / f"step_{step:08d}"
        tmp = self.ckpt_dir / f"step_{step:08d}.tmp"

        # 1. Every rank gathers (and checks) what it will write -- on the main thread, while the
        #    caller's tensors are still live, and on every rank (FSDP's state-dict calls are SPMD);
        #    rank 0 makes a fresh tmp dir. The agreement below is also the barrier that orders the
        #    mkdir before anyone's writes.
        err: BaseException | None = None
        files: dict[str, Any] = {}
        texts: dict[str, str] = {}
        dcp_state = None
        try:
            files, texts, dcp_state = self._collect(model, optimizer, trainer_state, rank_state, config, fsdp)
            if self.async_save:
                files = _to_cpu(files)  # a CPU snapshot: training may change parameters right away
        except Exception as e:
            err = e
        if self.rank == 0 and err is None:
            try:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                self._remove_stale()
                tmp.mkdir()
            except OSError as e:
                err = e
        if not self._all_ok(err is None):
            if self.rank == 0:
                _rmtree_quiet(tmp)
            raise self._save_error(step, err, rank_failed=err is None) from err
        pending = _Pending(step, tmp, final)

        if not self.async_save:
            self._write_local(pending, files, texts, dcp_state)
            self._pending = pending
            self._finish_pending()
            return final

        # 3. Async: write (and with one process, commit) on a background thread.
        dcp_future = None
        if dcp_state is not None:
            try:  # stages the shards to CPU now, writes them on DCP's own thread
                dcp_future = self._dcp_async_save(dcp_state, tmp / "dcp")
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
                pending.error = e
                self._pending = pending
                self._finish_pending()  # agrees on the failure, cleans up and raises

        def work() -> None:
            self._write_local(pending, files, texts, None)  # errors -> pending.error
            if dcp_future is not None:
                try:
                    dcp_future.result()
                except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                    pending.error = pending.error or e
            if pending.error is None and (self.world_size == 1 or not _dist_on()):
                try:
                    self._commit(pending)
                except BaseException as e:  # noqa: BLE001
                    pending.error = e

        pending.thread = threading.Thread(target=work, name=f"ckpt-save-{step}", daemon=True)
        self._pending = pending
        pending.thread.start()
        return final

    def wait(self) -> None:
        """Block until the in-flight save (if any) is committed; raise its error if it failed.
        Collective with several ranks and ``async_save`` (it runs the commit)."""
        self._finish_pending()

    def _collect(self, model, optimizer, trainer_state, rank_state, config, fsdp):
        """(files to torch.save, text files, DCP state dict or None) for this rank."""
        files: dict[str, Any] = {}
        texts: dict[str, str] = {}
        if rank_state is not None:
            _check_plain(rank_state, "rank_state")
            files[f"rank_{self.rank}.pt"] = dict(rank_state)
        dcp_state = None
        if fsdp:
            from torch.distributed.checkpoint.state_dict import get_state_dict

            if optimizer is not None:
                model_sd, optim_sd = get_state_dict(model, optimizer)
                dcp_state = {"model": _strip_prefixes(model_sd), "optim": optim_sd}
            else:
                from torch.distributed.checkpoint.state_dict import get_model_state_dict

                dcp_state = {"model": _strip_prefixes(get_model_state_dict(model))}
        if self.rank == 0:
            _check_plain(trainer_state, "trainer_state")
            files["trainer_state.pt"] = dict(trainer_state)
            if not fsdp:
                files["model.pt"] = _strip_prefixes(model.state_dict())
                if optimizer is not None:
                    files["optim.pt"] = optimizer.state_dict()
            cfg = _jsonable(_config_dict(config))
            texts["config.yaml"] = yaml.safe_dump(cfg, sort_keys=False)
            texts["config.json"] = json.dumps(cfg, indent=2) + "\n"
        return files, texts, dcp_state

    def _write_local(self, pending: _Pending, files, texts, dcp_state) -> None:
        """Write this rank's files into the tmp dir; an error is recorded on ``pending``."""
        if dcp_state is not None:  # first: a collective every rank must enter, whatever else fails
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint import FileSystemWriter

            try:
                dcp.save(dcp_state, storage_writer=FileSystemWriter(str(pending.tmp / "dcp"), sync_files=True))
            except BaseException as e:  # noqa: BLE001 - DCP raises CheckpointException, a BaseException
                pending.error = e
                return
        try:
            for name, obj in files.items():
                _torch_save(obj, pending.tmp / name)
            for name, text in texts.items():
                _write_text(pending.tmp / name, text)
        except Exception as e:
            pending.error = e

    def _dcp_async_save(self, dcp_state, dcp_dir: Path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        if self._gloo_group is None and _dist_on():
            # DCP's background collectives must not share the training group (NCCL) with the
            # training loop's; a gloo group is what torch documents for async_save.
            self._gloo_group = torch.distributed.new_group(backend="gloo")
        return dcp.async_save(
            dcp_state, storage_writer=FileSystemWriter(str(dcp_dir), sync_files=True), process_group=self._gloo_group
        )

    def _finish_pending(self) -> None:
        """Join the in-flight save, then (multi-rank) agree on success and commit; raise on failure."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.thread is not None:
            pending.thread.join()
        single = self.world_size == 1 or not _dist_on()
        if single:
            if pending.error is None and not pending.committed:
                try:
                    self._commit(pending)
                except BaseException as e:  # noqa: BLE001
                    pending.error = e
            if pending.error is not None:
                self._rollback(pending)
                raise self._save_error(pending.step, pending.error) from pending.error
            return
        # Several ranks: everyone's files must be written before rank 0 commits.
        if not self._all_ok(pending.error is None):
            self._barrier()  # every rank has stopped writing
            if self.rank == 0:
                self._rollback(pending)
            raise self._save_error(pending.step, pending.error, rank_failed=pending.error is None) from pending.error
        err = None
        if self.rank == 0:
            try:
                self._commit(pending)
            except BaseException as e:  # noqa: BLE001
                err = e
        if not self._all_ok(err is None):
            if self.rank == 0:
                self._rollback(pending)
            raise self._save_error(pending.step, err, rank_failed=err is None) from err

    def _rollback(self, pending: _Pending) -> None:
        """Undo a failed save (rank 0): drop its tmp dir and any half-committed step dir, and put
        back a complete checkpoint of the same step that was moved aside."""
        _rmtree_quiet(pending.tmp)
        if pending.committed:
            return
        final = pending.final
        aside = final.with_name(final.name + ".replaced")
        if final.exists() and not _is_complete(final):
            _rmtree_quiet(final)
        if aside.exists() and not final.exists():
            try:
                os.rename(aside, final)
            except OSError as e:
                log.warning("could not move %s back to %s (%s); it is still found by latest()", aside, final, e)

    def _save_error(self, step: int, err: BaseException | None, rank_failed: bool = False) -> CheckpointError:
        where = self.ckpt_dir / f"step_{step:08d}"
        prev = self._previous_note()
        if isinstance(err, CheckpointError):
            return CheckpointError(f"checkpoint step {step} was not saved: {err}; {prev}")
        if err is None or rank_failed:
            return CheckpointError(
                f"checkpoint step {step} was not saved to {where}: another rank failed (see its log); {prev}"
            )
        if _is_enospc(err):
            return CheckpointError(
                f"no space left on device while writing checkpoint step {step} to {self.ckpt_dir}; free space "
                f"or point checkpoint.dir elsewhere; {prev}"
            )
        return CheckpointError(
            f"could not write checkpoint step {step} to {where} ({type(err).__name__}: {err}); {prev}"
        )

    # ------------------------------------------------------------------ commit + retention (rank 0)

    def _commit(self, pending: _Pending) -> None:
        tmp, final = pending.tmp, pending.final
        for r in range(self.world_size):
            if not (tmp / f"rank_{r}.pt").exists() and any(tmp.glob("rank_*.pt")):
                raise CheckpointError(
                    f"rank {r}'s file is missing from {tmp}: checkpoint.dir must be on a filesystem all "
                    f"ranks share"
                )
        paths = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
        files = {
            p.relative_to(tmp).as_posix(): {"sha256": digest, "size": size}
            for p, (digest, size) in zip(paths, _sha256_many(paths))
        }
        dcp_dir = tmp / "dcp"
        fsdp = dcp_dir.is_dir()
        if fsdp:
            for d in dcp_dir.rglob("*"):
                if d.is_dir():
                    _fsync_dir(d)
            _fsync_dir(dcp_dir)
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": pending.step,
            "world_size": self.world_size,
            "fsdp": fsdp,
            "created_unix": time.time(),
            "torch_version": torch.__version__,
            "files": files,
        }
        _write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        _fsync_dir(tmp)

        aside = None
        if final.exists():
            if _is_complete(final):
                aside = final.with_name(final.name + ".replaced")
                _rmtree_quiet(aside)
                os.rename(final, aside)
            else:
                shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.ckpt_dir)
        _write_text(final / COMMITTED, f"{pending.step}\n")
        _fsync_dir(final)
        pending.committed = True
        try:
            self._retain(keep=final)  # also deletes `aside`
        except Exception as e:  # retention is housekeeping: it never fails a committed save
            log.warning("checkpoint step %d is committed, but cleaning up old ones failed: %s", pending.step, e)

    def _delete(self, path: Path) -> bool:
        """Delete a checkpoint dir: the COMMITTED marker first, so a half-deleted one is never loaded."""
        try:
            (path / COMMITTED).unlink(missing_ok=True)
            shutil.rmtree(path)
            return True
        except OSError as e:
            log.warning("could not delete old checkpoint %s (%s); delete it by hand", path, e)
            return False

    def _retain(self, keep: Path) -> None:
        self._remove_replaced()
        complete = _complete_checkpoints(self.ckpt_dir)
        if not complete:
            return
        newest = complete[-1][1]
        for _, path in complete[: -self.keep_last]:
            if path == keep or path == newest:
                continue
            self._delete(path)

    def _remove_stale(self) -> None:
        """Remove what crashed saves and failed deletes left (none is in flight: the previous save
        was joined and committed)."""
        for entry in self.ckpt_dir.iterdir():
            if _TMP_RE.match(entry.name) and entry.is_dir():
                log.warning("removing %s, left by an interrupted checkpoint save", entry)
                _rmtree_quiet(entry)
            elif _STEP_RE.match(entry.name) and entry.is_dir() and not _is_complete(entry):
                # Never loadable (no COMMITTED / manifest): a half-deleted old one, or a save killed
                # between its rename and its marker.
                log.warning("removing %s, an incomplete checkpoint (no COMMITTED marker or manifest)", entry)
                _rmtree_quiet(entry)
        self._remove_replaced()

    def _remove_replaced(self) -> None:
        """Delete old copies moved aside by a re-save once the new copy is complete."""
        for entry in self.ckpt_dir.iterdir():
            m = _REPLACED_RE.match(entry.name)
            if m and entry.is_dir() and _is_complete(self.ckpt_dir / f"step_{m.group(1)}"):
                self._delete(entry)

    # ------------------------------------------------------------------ load

    def load(self, path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             fsdp: bool = False) -> tuple[dict, dict | None]:
        """Load a checkpoint into ``model`` / ``optimizer`` (collective with ``fsdp``).

        Returns (trainer_state, rank_state or None if this rank did not exist at save time).
        Every file this rank reads is checked against the manifest's sha256 first. An FSDP
        checkpoint loads at any world size (DCP reshards), also into a plain model (``fsdp=False``:
        DDP, or one process without a process group); a non-FSDP one only into a plain model."""
        self._finish_pending()
        path = Path(path)
        manifest = _read_manifest(path)
        saved_fsdp = bool(manifest.get("fsdp"))
        if fsdp and not saved_fsdp:
            raise CheckpointError(
                f"checkpoint {path} was saved without FSDP and cannot be loaded into an FSDP model; resume "
                f"with DDP / a single process (or export it with load_model_state() and start a new run)"
            )
        rank_file = f"rank_{self.rank}.pt"
        has_rank = rank_file in manifest["files"]
        needed = ["trainer_state.pt"] + ([rank_file] if has_rank else [])
        if saved_fsdp:
            needed += [n for n in manifest["files"] if n.startswith("dcp/")]
        else:
            needed += ["model.pt"] + (["optim.pt"] if optimizer is not None else [])
        _verify(path, manifest, needed)

        if saved_fsdp:
            # Into an FSDP model, or a plain one (DDP / single process: each rank reads full tensors,
            # with no process group at all in a single process). Names are FQNs on both sides.
            model = model if fsdp else _unwrap(model)
            from torch.distributed.checkpoint.state_dict import (
                get_model_state_dict,
                get_state_dict,
                set_model_state_dict,
                set_state_dict,
            )

            if optimizer is not None:
                model_sd, optim_sd = get_state_dict(model, optimizer)
                state = {"model": _strip_prefixes(model_sd), "optim": optim_sd}
            else:
                state = {"model": _strip_prefixes(get_model_state_dict(model))}
            reader = _safe_reader(path / "dcp")
            reader.read_metadata()  # refuses a tampered .metadata here, with a clear message
            # Reads only this rank's shards of each tensor (DCP reshards if the world size changed).
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                _dcp_load(path / "dcp", state, reader=reader, no_dist=not _dist_on())
            if optimizer is not None:
                set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            else:
                set_model_state_dict(model, state["model"])
        else:
            model_sd = _strip_prefixes(_safe_torch_load(path / "model.pt"))
            try:
                _unwrap(model).load_state_dict(model_sd)
            except RuntimeError as e:
                raise CheckpointError(
                    f"checkpoint file {path / 'model.pt'} does not fit this model ({str(e).splitlines()[0]} ...); "
                    f"load it with the model config in {path / 'config.yaml'}"
                ) from None
            if optimizer is not None:
                try:
                    optimizer.load_state_dict(_safe_torch_load(path / "optim.pt"))
                except (ValueError, KeyError) as e:
                    raise CheckpointError(
                        f"checkpoint file {path / 'optim.pt'} does not fit this optimizer ({e}); use the "
                        f"optimizer settings in {path / 'config.yaml'}"
                    ) from None
        trainer_state = _safe_torch_load(path / "trainer_state.pt")
        rank_state = _safe_torch_load(path / rank_file) if has_rank else None
        return trainer_state, rank_state

    @staticmethod
    def load_model_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
        return load_model_state(path)


def load_model_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state_dict with GPT parameter names, full tensors on CPU; the run's config dict),
    from a checkpoint saved with or without FSDP. One process, no process group needed."""
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest.get("fsdp"):
        names = [n for n in manifest["files"] if n.startswith("dcp/")]
    else:
        names = ["model.pt"]
    has_config = "config.json" in manifest["files"]
    _verify(path, manifest, names + (["config.json"] if has_config else []))
    if manifest.get("fsdp"):
        state = _strip_prefixes(_dcp_full_model_state(path / "dcp"))
        # DCP stores a tied weight once per name: share it again (as torch.load does for model.pt).
        wte, head = state.get("transformer.wte.weight"), state.get("lm_head.weight")
        if wte is not None and head is not None and torch.equal(wte, head):
            state["lm_head.weight"] = wte
    else:
        state = _strip_prefixes(_safe_torch_load(path / "model.pt"))
    config = json.loads((path / "config.json").read_text()) if has_config else {}
    return state, config


__all__ = [
    "Checkpointer",
    "CheckpointError",
    "capture_rng_state",
    "restore_rng_state",
    "load_model_state",
]
