"""``Checkpointer``: one run's saves (sync or async), discovery and loads, over the pieces of this
package -- the layout (``layout.py``), the commit protocol (``commit.py``), writing (``writing.py``),
retention (``retention.py``) and loading (``load.py``). It owns the process-group side: the
agreements between ranks around each save."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from pretrain import dist
from pretrain.checkpoint.commit import Pending, commit, rollback
from pretrain.checkpoint.fsio import _is_enospc, _rmtree_quiet
from pretrain.checkpoint.layout import CheckpointError, _complete_checkpoints
from pretrain.checkpoint.load import load, load_model_state
from pretrain.checkpoint.retention import remove_stale
from pretrain.checkpoint.state import _check_plain, _config_dict, _jsonable, _strip_prefixes, _to_cpu
from pretrain.checkpoint.writing import dcp_async_save, write_local


class Checkpointer:
    """Saves, finds and loads checkpoints of one run (the layout: ``pretrain/checkpoint/__init__.py``).

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
        self._pending: Pending | None = None
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
        A rank that stops answering fails it with one line naming ``what`` (dist.collective)."""
        if self.world_size == 1 or not dist.group_up():
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, what, op="min")
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
        if self.world_size > 1 and not dist.group_up():
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
                remove_stale(self.ckpt_dir)
                tmp.mkdir()
            except OSError as e:
                err = e
        if not self._all_ok(err is None):
            if self.rank == 0:
                _rmtree_quiet(tmp)
            raise self._save_error(step, err, rank_failed=err is None) from err
        pending = Pending(step, tmp, final)

        if not self.async_save:
            write_local(pending, files, texts, dcp_state)
            self._pending = pending
            self._finish_pending()
            return final

        # 3. Async: write (and with one process, commit) on a background thread.
        dcp_future = None
        if dcp_state is not None:
            try:  # stages the shards to CPU now, writes them on DCP's own thread
                dcp_future = dcp_async_save(dcp_state, tmp / "dcp", self._dcp_group())
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
                pending.error = e
                self._pending = pending
                self._finish_pending()  # agrees on the failure, cleans up and raises

        def work() -> None:
            write_local(pending, files, texts, None)  # errors -> pending.error
            if dcp_future is not None:
                try:
                    dcp_future.result()
                except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                    pending.error = pending.error or e
            if pending.error is None and (self.world_size == 1 or not dist.group_up()):
                try:
                    commit(pending, self.ckpt_dir, self.world_size, self.keep_last)
                except BaseException as e:  # noqa: BLE001
                    pending.error = e

        pending.thread = threading.Thread(target=work, name=f"ckpt-save-{step}", daemon=True)
        self._pending = pending
        pending.thread.start()
        return final

    def _dcp_group(self):
        """A gloo group for dcp.async_save's background collectives: they must not share the
        training group (NCCL) with the training loop's, as torch documents for async_save."""
        if self._gloo_group is None and dist.group_up():
            self._gloo_group = torch.distributed.new_group(backend="gloo")
        return self._gloo_group

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

    def _finish_pending(self) -> None:
        """Join the in-flight save, then (multi-rank) agree on success and commit; raise on failure."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.thread is not None:
            pending.thread.join()
        single = self.world_size == 1 or not dist.group_up()
        if single:
            if pending.error is None and not pending.committed:
                try:
                    commit(pending, self.ckpt_dir, self.world_size, self.keep_last)
                except BaseException as e:  # noqa: BLE001
                    pending.error = e
            if pending.error is not None:
                rollback(pending)
                raise self._save_error(pending.step, pending.error) from pending.error
            return
        # Several ranks: everyone's files must be written before rank 0 commits.
        if not self._all_ok(pending.error is None):
            self._barrier()  # every rank has stopped writing
            if self.rank == 0:
                rollback(pending)
            raise self._save_error(pending.step, pending.error, rank_failed=pending.error is None) from pending.error
        err = None
        if self.rank == 0:
            try:
                commit(pending, self.ckpt_dir, self.world_size, self.keep_last)
            except BaseException as e:  # noqa: BLE001
                err = e
        if not self._all_ok(err is None):
            if self.rank == 0:
                rollback(pending)
            raise self._save_error(pending.step, err, rank_failed=err is None) from err

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
                f"there or point train.run_dir (its checkpoints/ folder) at another filesystem; {prev}"
            )
        return CheckpointError(
            f"could not write checkpoint step {step} to {where} ({type(err).__name__}: {err}); {prev}"
        )

    # ------------------------------------------------------------------ commit + retention (rank 0)

    # ------------------------------------------------------------------ load

    def load(self, path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             fsdp: bool = False) -> tuple[dict, dict | None]:
        """Load a checkpoint into ``model`` / ``optimizer`` (collective with ``fsdp``); see :func:`load.load`.
        Returns (trainer_state, rank_state or None if this rank did not exist at save time)."""
        self._finish_pending()
        return load(path, model, optimizer, rank=self.rank, fsdp=fsdp)

    @staticmethod
    def load_model_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
        return load_model_state(path)
