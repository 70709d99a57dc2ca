"""Writing one rank's files into a save's tmp directory: in the foreground, or (async saves) on a
background thread after a CPU snapshot.

Async saves (``async_save=True``): ``save()`` copies the state to CPU (so the caller may mutate
parameters as soon as it returns), then writes on a background thread. At most one save is in
flight: a new ``save()`` first waits for the previous one. Errors of a background save are raised
by the next ``save()``/``wait()``. With one process the background thread also commits. With
several processes each rank writes its files in its thread and the *commit* (the agreement
all-reduce and rank 0's rename) happens in the next ``save()`` or ``wait()`` on the main thread,
so no collective runs on a background thread on the training process group (FSDP's DCP shards
are written by ``dcp.async_save`` on a dedicated gloo group). So with several ranks, call
``wait()`` (collectively) before exiting, or the last async checkpoint stays uncommitted.
"""

from __future__ import annotations

from pathlib import Path

from pretrain.checkpoint.commit import Pending
from pretrain.checkpoint.fsio import _torch_save, _write_text


def write_local(pending: Pending, files, texts, dcp_state) -> None:
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


def dcp_async_save(dcp_state, dcp_dir: Path, process_group):
    """Start DCP's own async write of ``dcp_state`` (staged to CPU now); returns its future."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    return dcp.async_save(
        dcp_state, storage_writer=FileSystemWriter(str(dcp_dir), sync_files=True), process_group=process_group
    )
