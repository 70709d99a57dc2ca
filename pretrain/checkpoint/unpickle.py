"""Restricted loading: ``torch.load(weights_only=True)`` for our files, and for DCP (FSDP2)
checkpoints a metadata unpickler and a load planner that refuse anything but plain data, so a
checkpoint cannot run code when it is loaded."""

from __future__ import annotations

import pathlib
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint.layout import _CORRUPT_HINT, CheckpointError


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
