"""Loading: every file a rank reads is checked against the manifest's sha256 first, then read
with ``weights_only`` loads (``unpickle.py``). ``load_model_state`` serves export / eval /
generate: one process, no process group, FSDP checkpoints included."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from pretrain import dist
from pretrain.checkpoint.layout import CheckpointError, _read_manifest, _verify
from pretrain.checkpoint.state import _strip_prefixes, _unwrap
from pretrain.checkpoint.unpickle import _dcp_full_model_state, _dcp_load, _safe_reader, _safe_torch_load


def load(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         rank: int = 0, fsdp: bool = False) -> tuple[dict, dict | None]:
    """Load a checkpoint into ``model`` / ``optimizer`` (collective with ``fsdp``).

    Returns (trainer_state, rank_state or None if this rank did not exist at save time).
    Every file this rank reads is checked against the manifest's sha256 first. An FSDP
    checkpoint loads at any world size (DCP reshards), also into a plain model (``fsdp=False``:
    DDP, or one process without a process group); a non-FSDP one only into a plain model."""
    path = Path(path)
    manifest = _read_manifest(path)
    saved_fsdp = bool(manifest.get("fsdp"))
    if fsdp and not saved_fsdp:
        raise CheckpointError(
            f"checkpoint {path} was saved without FSDP and cannot be loaded into an FSDP model; resume "
            f"with DDP / a single process (or export it with load_model_state() and start a new run)"
        )
    rank_file = f"rank_{rank}.pt"
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
            _dcp_load(path / "dcp", state, reader=reader, no_dist=not dist.group_up())
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


def verify_model_state(path: str | os.PathLike) -> tuple[dict, dict]:
    """Check that ``path`` is a complete checkpoint whose model files (and config) hold what its
    manifest records, without loading a tensor; returns (manifest, the run's config dict)."""
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest.get("fsdp"):
        names = [n for n in manifest["files"] if n.startswith("dcp/")]
    else:
        names = ["model.pt"]
    has_config = "config.json" in manifest["files"]
    _verify(path, manifest, names + (["config.json"] if has_config else []))
    config = json.loads((path / "config.json").read_text()) if has_config else {}
    return manifest, config


def load_model_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state_dict with GPT parameter names, full tensors on CPU; the run's config dict),
    from a checkpoint saved with or without FSDP. One process, no process group needed."""
    path = Path(path)
    manifest, config = verify_model_state(path)
    if manifest.get("fsdp"):
        state = _strip_prefixes(_dcp_full_model_state(path / "dcp"))
        # DCP stores a tied weight once per name: share it again (as torch.load does for model.pt).
        wte, head = state.get("transformer.wte.weight"), state.get("lm_head.weight")
        if wte is not None and head is not None and torch.equal(wte, head):
            state["lm_head.weight"] = wte
    else:
        state = _strip_prefixes(_safe_torch_load(path / "model.pt"))
    return state, config
