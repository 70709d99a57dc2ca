"""The run plan: everything about a run that is decided before anything is built or written.

::

    cfg = load_config(path, overrides)        # typed, validated (pretrain/config.py)
    plan = make_plan(cfg, world_size)         # this module: resolved once, every check that can refuse
    trainer = build_trainer(plan, ...)        # pretrain/training/build.py: the parts, built from the plan

``make_plan`` is one function of the validated config and the world size. It builds no model and
no loader and writes nothing; what it finds is read by every later part, which recomputes none
of it:

- the batch arithmetic (``Batching``): the global batch, the micro-steps of each step (batch-size
  warmup included), the loader's unit, the eval batch, the tokens of the whole run;
- the one checkpoint the run resumes from (``checkpoint.resume`` auto | none | PATH), its step and
  tokens, and that its loader state fits this data and these settings;
- where the first weights come from (``model.init_from``, resolved by
  ``pretrain.model.weights.resolve``), or why they are ignored (a resumed run: the checkpoint wins);
- the training data: the prepare finished, every shard's header and size (remote data: its manifest
  and one listing), the manifest's token counts and token range (``data_pipeline.loader.inspect_split``);
- the run directory: usable, and whether an earlier run in it will be moved aside
  (``checkpoint.overwrite``).

A problem is a ``ConfigError`` with one line naming the thing and the fix (the CLI exits 2).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pretrain.config import Config, ConfigError
from pretrain.model.weights import WeightsError, WeightsSource
from pretrain.rundir.layout import CHECKPOINTS, TENSORBOARD
from pretrain.schedule import batch_tokens_at, lr_at, tokens_before

if TYPE_CHECKING:
    from data_pipeline.loader import SplitInfo


@dataclass(frozen=True)
class Batching:
    """The batch arithmetic of a run, from the config and the world size (:func:`batching`).

    ``micro_batch_tokens`` = micro_batch_size x seq_len x world_size is one micro-step over every
    rank; a step of ``b`` tokens runs ``b // micro_batch_tokens`` micro-steps on each rank."""

    world_size: int
    micro_batch_size: int
    seq_len: int
    micro_batch_tokens: int
    tokens_per_step: int
    """The global batch after any batch-size warmup (train.global_batch_tokens)."""
    grad_accum_steps: int
    """Micro-steps per step at the full global batch."""
    global_batch_seqs: int
    loader_batch_seqs: int
    """The loader's unit: the global batch in sequences, or with a batch-size warmup its first
    (smallest) batch, of which every later step's batch is a multiple."""
    eval_batch_size: int
    """Sequences per evaluation forward (eval.batch_size, default train.micro_batch_size)."""
    total_tokens: int
    warmup_start_tokens: int
    warmup_steps: int

    def tokens_at(self, step: int) -> int:
        """The global batch (tokens) of optimizer step ``step`` (0-based)."""
        return batch_tokens_at(step, self.tokens_per_step, self.warmup_start_tokens, self.warmup_steps)

    def accum_at(self, step: int) -> int:
        """Micro-steps of optimizer step ``step`` on each rank."""
        return self.tokens_at(step) // self.micro_batch_tokens


def batching(cfg: Config, world_size: int) -> Batching:
    """The batch arithmetic, or a ``ConfigError`` when the batches do not divide."""
    t, s, seq = cfg.train, cfg.schedule, cfg.data.seq_len
    per_micro = t.micro_batch_size * seq * world_size
    if t.global_batch_tokens % per_micro:
        raise ConfigError(
            f"train.global_batch_tokens={t.global_batch_tokens} is not divisible by micro_batch_size*seq_len*"
            f"world_size = {t.micro_batch_size}*{seq}*{world_size} = {per_micro}; "
            f"choose a global batch that is a multiple of {per_micro} or change train.micro_batch_size"
        )
    warm = s.batch_warmup_steps > 0
    if warm and s.batch_warmup_start_tokens % per_micro:
        raise ConfigError(
            f"schedule.batch_warmup_start_tokens={s.batch_warmup_start_tokens} is not a multiple of "
            f"micro_batch_size*seq_len*world_size = {per_micro}; every step of the batch warmup must be whole "
            "micro-steps"
        )
    start = s.batch_warmup_start_tokens if warm else 0
    return Batching(
        world_size=world_size,
        micro_batch_size=t.micro_batch_size,
        seq_len=seq,
        micro_batch_tokens=per_micro,
        tokens_per_step=t.global_batch_tokens,
        grad_accum_steps=t.global_batch_tokens // per_micro,
        global_batch_seqs=t.global_batch_tokens // seq,
        loader_batch_seqs=(start if warm else t.global_batch_tokens) // seq,
        eval_batch_size=cfg.eval.batch_size or t.micro_batch_size,
        total_tokens=tokens_before(s.max_steps, t.global_batch_tokens, start, s.batch_warmup_steps),
        warmup_start_tokens=start,
        warmup_steps=s.batch_warmup_steps,
    )


@dataclass(frozen=True)
class RunPlan:
    """A run, resolved (:func:`make_plan`). Read-only: every later part reads it."""

    cfg: Config
    batch: Batching
    run_dir: Path
    ckpt_dir: Path
    resume_from: Path | None
    """The checkpoint this run continues, or None for a fresh start."""
    resume_step: int
    resume_tokens: int
    init_source: WeightsSource | None
    """model.init_from, resolved; None without it or when a checkpoint is resumed."""
    init_note: str | None
    """The log line when model.init_from is ignored (a resumed run)."""
    move_aside: bool
    """checkpoint.overwrite: an earlier run in run_dir is moved into run_dir/overwritten-<date>/."""
    train_split: SplitInfo
    """The training split as checked (``data_pipeline.loader.inspect_split``): the loader is built
    on it, so the data is listed and its headers read once per start."""

    @property
    def train_tokens(self) -> int:
        """Tokens of the training split (for the start-up summary)."""
        return int(self.train_split.shard_tokens.sum())

    @property
    def world_size(self) -> int:
        return self.batch.world_size

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based): the schedule of the config."""
        o, s = self.cfg.optim, self.cfg.schedule
        return lr_at(step, o.lr, s.warmup_steps, s.max_steps, s.min_lr_ratio, name=s.name,
                     cooldown_frac=s.cooldown_frac, cooldown=s.cooldown)


def has_checkpoints(ckpt_dir: Path) -> bool:
    return ckpt_dir.is_dir() and any(re.match(r"^step_\d{8}", p.name) for p in ckpt_dir.iterdir())


def make_plan(cfg: Config, world_size: int) -> RunPlan:
    """Resolve the run (see the module docstring); ``ConfigError`` in one line on any problem."""
    from pretrain.rundir.lock import previous_run_entries

    _check_environment(cfg)
    batch = batching(cfg, world_size)
    run_dir = Path(cfg.train.run_dir)
    ckpt_dir = run_dir / CHECKPOINTS
    _check_run_dir(run_dir, cfg.logging.tensorboard)
    resume = _resume_path(cfg, ckpt_dir)
    state = _read_trainer_state(resume, cfg.schedule.max_steps) if resume is not None else None
    if resume is not None:
        _check_resume_setup(resume, cfg)
    split = _check_data(cfg, batch, state["loader"] if state is not None else None, resume)
    init_source, init_note = None, None
    if cfg.model.init_from is not None:
        if resume is not None:
            init_note = f"model.init_from={cfg.model.init_from} ignored: resuming checkpoint {resume} (the checkpoint wins)"
        else:
            init_source = _resolve_init(cfg.model.init_from, cfg)
    c = cfg.checkpoint
    move_aside = c.resume == "none" and c.overwrite and bool(previous_run_entries(run_dir))
    if move_aside:  # the one step that changes a run already there: every shard must be sound first
        _verify_shards(split, cfg.data.dir)
    return RunPlan(
        cfg=cfg, batch=batch, run_dir=run_dir, ckpt_dir=ckpt_dir, resume_from=resume,
        resume_step=int(state["step"]) if state is not None else 0,
        resume_tokens=int(state.get("tokens_seen", 0)) if state is not None else 0,
        init_source=init_source, init_note=init_note, move_aside=move_aside,
        train_split=split,
    )


def _check_environment(cfg: Config) -> None:
    """This machine has what the config asks for: CUDA for train.device=cuda, the tensorboard package."""
    if cfg.logging.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError(
                "logging.tensorboard=true needs the tensorboard package, which is not installed; "
                "pip install -e '.[tensorboard]' (or pip install tensorboard), or set logging.tensorboard=false"
            )
    if cfg.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but CUDA is not available here; use train.device=auto or cpu")


def _check_run_dir(run_dir: Path, tensorboard: bool) -> None:
    """train.run_dir must be a directory or creatable as one (nothing is created here), and so
    must run_dir/tensorboard with logging.tensorboard."""
    p = run_dir
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"train.run_dir={str(run_dir)!r}: {p} exists and is not a directory; "
                          "choose another train.run_dir")
    why = _unwritable(p)
    if why:
        raise ConfigError(f"train.run_dir={str(run_dir)!r}: {p} {why}; choose another train.run_dir")
    tb = run_dir / TENSORBOARD
    if not tensorboard:
        return
    fix = "move it away or set logging.tensorboard=false"
    if tb.is_symlink() and not tb.exists():
        raise ConfigError(f"logging.tensorboard=true writes {tb}/, but {tb} is a link to {os.readlink(tb)}, which "
                          f"does not exist; {fix}")
    if tb.exists() and not tb.is_dir():
        raise ConfigError(f"logging.tensorboard=true writes {tb}/, but {tb} is a file; {fix}")
    why = _unwritable(tb) if tb.is_dir() else None
    if why:
        raise ConfigError(f"logging.tensorboard=true writes {tb}/, but it {why}; {fix}")


def _unwritable(d: Path) -> str | None:
    """Why this process cannot create files in the directory ``d`` (None: it can). access(2) answers
    for the caller's permissions and for a read-only mount alike (as root too); statvfs tells which."""
    if os.access(d, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return "is on a read-only file system" if read_only else "is not writable by this user (its permissions)"


def _resume_path(cfg: Config, ckpt_dir: Path) -> Path | None:
    """The one checkpoint this run resumes from: the newest complete one in the run directory
    (auto; None if there is none), None (none), or the given path."""
    from pretrain.checkpoint import Checkpointer

    c = cfg.checkpoint
    if c.resume == "none":
        if has_checkpoints(ckpt_dir) and not c.overwrite:  # a fresh start never silently reuses a run's
            raise ConfigError(
                f"{ckpt_dir} already holds checkpoints and checkpoint.resume=none; continue with "
                f"--resume auto, pick another train.run_dir, or pass checkpoint.overwrite=true to move them aside"
            )
        return None
    if c.resume == "auto":
        return Checkpointer(ckpt_dir, keep_last=1).latest()
    path = Path(c.resume)
    if not path.exists():
        raise ConfigError(f"checkpoint.resume={c.resume!r}: no such checkpoint; pass auto, none or an existing path")
    return path


def _read_trainer_state(path: Path, max_steps: int) -> dict:
    """The resumed checkpoint's step, tokens and loader state; it must not be past max_steps."""
    import torch

    state_file = path / "trainer_state.pt"
    if not state_file.is_file():
        raise ConfigError(f"checkpoint.resume={str(path)!r} is not a checkpoint (no {state_file.name}); pass the "
                          "path of a step_XXXXXXXX directory, auto or none")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        int(state["step"]), state["loader"]  # noqa: B018 - the keys a resume needs
    except Exception as e:  # unpickling / zip / key errors all mean the same here
        first = " ".join((str(e).strip().splitlines() or [type(e).__name__])[0].split())[:120]
        older = sorted(p for p in path.parent.glob("step_*") if p.name < path.name and (p / "COMMITTED").exists())
        fix = (f"resume from the checkpoint before it: --resume {older[-1]}" if older else
               f"start a new run from its weights: --resume none model.init_from={path} train.run_dir=NEW_DIR")
        raise ConfigError(f"{state_file}: unreadable trainer state ({first}); {fix}") from None
    if int(state["step"]) > max_steps:
        # Ending at once would call a run "done" that never ran to this max_steps and rewrite its
        # config.yaml with a schedule its weights did not follow: refuse instead.
        raise ConfigError(
            f"{path} is at step {int(state['step'])}, past schedule.max_steps={max_steps}; pass schedule.max_steps >= "
            f"{int(state['step'])} to continue it, or start a new run from its weights (--resume none "
            f"model.init_from={path}, another train.run_dir)")
    return state


def _check_resume_setup(path: Path, cfg: Config) -> None:
    """The checkpoint's optimizer and parallelism fit this run: an optimizer's state cannot carry
    over to another optimizer, and a checkpoint saved without FSDP cannot load into FSDP shards."""
    import json

    try:
        manifest = json.loads((path / "manifest.json").read_text())
        saved = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    except (OSError, ValueError):
        return  # an unreadable manifest is the checkpoint loader's to report (with its checksums)
    saved_optim = (saved.get("optim") or {}).get("name", "adamw") if isinstance(saved, dict) else "adamw"
    if saved_optim != cfg.optim.name:
        raise ConfigError(
            f"{path} was trained with optim.name={saved_optim}, this run asks for optim.name={cfg.optim.name}; "
            f"resume with optim.name={saved_optim}, or start a new run from its weights "
            f"(--resume none model.init_from={path})")
    if cfg.distributed.mode == "fsdp" and isinstance(manifest, dict) and not manifest.get("fsdp"):
        raise ConfigError(
            f"{path} was saved without FSDP and cannot be resumed with distributed.mode=fsdp; resume with "
            f"distributed.mode=ddp, or start a new run from its weights (--resume none model.init_from={path})")


def _verify_shards(split, data_dir: str) -> None:
    """Every shard of the split against its manifest sha256 (before an overwrite moves a run aside)."""
    from data_pipeline import integrity
    from data_pipeline.loader import integrity_error

    if split.store.remote:  # remote shards are verified as they are fetched (hashing them all = downloading them)
        return
    bad = integrity.verify_files([e for e in split.expected if e is not None])
    if bad:
        raise ConfigError(f"nothing was moved aside: {integrity_error(bad[0], Path(data_dir), 12)}")


def _check_data(cfg: Config, batch: Batching, loader_state: dict | None, resume: Path | None):
    """The training split is usable (the prepare finished, every shard whole, the token range the
    model takes, at least a global batch) and, when resuming, the checkpoint's loader state fits it.
    Remote data (data.dir a URL) is checked from its manifest and one listing: no shard is fetched."""
    from data_pipeline.loader import as_saved, check_resume_state, inspect_split
    from data_pipeline.shards import NoShardsError, ShardError

    d = cfg.data
    try:
        split = inspect_split(d.dir, "train", d.seq_len, batch.micro_batch_size, batch.loader_batch_seqs,
                              vocab_size=cfg.gpt_config.vocab_size, cache_dir=d.cache_dir,
                              allow_incomplete=d.allow_incomplete)
    except NoShardsError:  # nothing to read: say how to make the data this data.dir names
        raise ConfigError(f"data.dir={d.dir!r} holds no training shards; create them with: "
                          f"{_create_command(cfg)}") from None
    except (ShardError, ValueError) as e:  # the message names the file and this directory's own fix
        msg = str(e)
        raise ConfigError(msg if str(d.dir).rstrip("/") in msg else f"{msg} (data.dir={d.dir!r})") from None
    if loader_state is not None:
        saved = as_saved(split, loader_state)
        if saved is not split:
            k = len(saved.files)
            print(f"note: {resume} trained on the first {k} training shards; the prepare has written "
                  f"{len(split.files) - k} more since: this run continues on the {k} it had (to train on all of them, "
                  f"start a new run from these weights: --resume none model.init_from={resume} train.run_dir=NEW_DIR)",
                  flush=True)
        split = saved
        try:
            check_resume_state(loader_state, split, d.seq_len, batch.loader_batch_seqs, batch.micro_batch_size,
                               batch.world_size, d.seed, d.shuffle)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"cannot resume from {resume}: {e}") from None
    return split


def _create_command(cfg: Config) -> str:
    """The command that creates data.dir: the one its manifest records, else data.prepare_command,
    with the directory it must write when that command writes another one (never advice that
    makes data somewhere the run does not read)."""
    import shlex

    from data_pipeline.shards import ShardError
    from data_pipeline.store import ShardStore

    d = cfg.data
    try:
        recorded = ShardStore(d.dir, d.cache_dir).manifest.command()
    except (ShardError, OSError):
        recorded = None
    if recorded:
        return recorded
    try:
        words = shlex.split(d.prepare_command)
    except ValueError:
        words = []
    if any(os.path.normpath(w) == os.path.normpath(d.dir) for w in words):
        return d.prepare_command
    return f"{d.prepare_command} (with {d.dir} as its output directory)"


def _resolve_init(spec: str, cfg: Config) -> WeightsSource:
    """The source of model.init_from, its files verified and its architecture checked against the
    config's (a hub model is checked when it is downloaded, in the build)."""
    from pretrain.model.weights import inspect, resolve
    from pretrain.training.init_from import check_architecture

    try:
        source = resolve(spec)
        source = replace(source, config=inspect(source))
    except WeightsError as e:
        raise ConfigError(f"model.init_from={spec!r}: {e}") from None
    if source.config is not None:
        check_architecture(spec, cfg.gpt_config, source.config)
    return source
