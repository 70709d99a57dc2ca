"""The training configuration: one typed dataclass per section, validated before any work.

A run is described by defaults < a YAML file < dotted command-line overrides::

    python pretrain/train.py --config configs/gpt2_124m.yaml optim.lr=3e-4 train.compile=false

Every field carries an attribute docstring; those docstrings are the ``--help`` text
(``python pretrain/train.py --help``). ``load_config`` rejects unknown keys (with a
did-you-mean), wrong types and impossible values with one line naming the key, the value and
the fix. YAML is read through ``pretrain.values.load_yaml`` only (bounded, safe). The numbers derived from a config and the
world size (accumulation steps, tokens per step, total tokens), the resume path and the data
check are resolved once, by the run plan (``pretrain/plan.py``).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pretrain.model import ARCH_FIELDS, PRESETS, GPTConfig
from pretrain.schedule import COOLDOWNS, MUON_ADJUST_LR, NS_DTYPE_NAMES, OPTIMIZERS, SCHEDULES, cooldown_start
from pretrain.values import MAX_YAML_BYTES, BoundError, load_yaml, read_bounded, short


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the key and the fix. A
    message is never longer than ``MAX_ERROR_CHARS`` (a value quoted in it is cut by :func:`short`
    first; this is the backstop), so a huge value cannot flood the terminal."""

    def __init__(self, message: str) -> None:
        message = " ".join(str(message).split())
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 5] + " ...)"
        super().__init__(message)


MAX_ERROR_CHARS = 1000


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class _ModelChoice:
    """The architecture: a preset of ``pretrain.model.PRESETS`` plus per-field overrides (every
    field of ``GPTConfig``, each None = the preset's value), and the weights to start from."""

    preset: str = "gpt2"
    """Model preset: gpt2 (124M), gpt2-medium, gpt2-large, gpt2-xl, tiny, tiny-vocab."""
    init_from: str | None = None
    """Start from existing weights (pretrain/training/init_from.py): null (random init) | a hub name (gpt2,
    gpt2-medium, gpt2-large, gpt2-xl, owner/name; needs the network) | a local Hugging Face GPT-2
    directory | a native checkpoint step_XXXXXXXX | a run's checkpoints/ folder (its newest). Weights
    only: fresh optimizer, step 0, this config's schedule. The architecture fields must match
    the source's (a mismatch is refused, naming the fields); padded vocabulary rows are added or
    dropped and a smaller block_size crops the positions. A resumed run ignores it (the checkpoint wins)."""

    def gpt_config(self) -> GPTConfig:
        """The architecture: the preset with the fields set here (``GPTConfig.from_dict``)."""
        return GPTConfig.from_dict(dataclasses.asdict(self))


# The model section is derived from GPTConfig (one schema): each architecture field once, with
# GPTConfig's type (or None = the preset's value) and GPTConfig's docstring (``field_docs``).
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [(name, typing.get_type_hints(GPTConfig)[name] | None, field(default=None)) for name in ARCH_FIELDS],
    bases=(_ModelChoice,), namespace={"__doc__": _ModelChoice.__doc__, "__module__": __name__},
)


@dataclass
class DataSection:
    """The token shards (``data_pipeline`` format) the run reads."""

    dir: str = "data/fineweb-edu-10B"
    """Directory of train_*.bin / val_*.bin shards (made by data_pipeline.prepare), or an fsspec URL
    of one (s3://, gs://, hf://, file://, ...): its shards are then copied into data.cache_dir."""
    seq_len: int = 1024
    """Tokens per training sequence (T); at most model.block_size."""
    shuffle: bool = True
    """Shuffle shard order and sequence order per epoch (from data.seed and the epoch)."""
    seed: int = 0
    """Seed of the data order (independent of train.seed)."""
    prepare_command: str = "python -m data_pipeline.prepare fineweb-edu-10B data/fineweb-edu-10B"
    """The command that creates data.dir; printed when data.dir does not exist or holds no shards
    (when it names data.dir; else `gpt2-prepare SOURCE <data.dir>`)."""
    cache_dir: str | None = None
    """Node-local directory for copies of the shards of a remote data.dir (a URL): each is fetched
    once per node, verified against the manifest's sha256 before use, the next one while the
    current one trains. Required when data.dir is a URL; unused otherwise."""
    allow_incomplete: bool = False
    """Train (and evaluate) on a directory whose gpt2-prepare has not finished (manifest
    'complete': false), using the shards written so far; by default such data is refused."""


@dataclass
class OptimSection:
    """AdamW and gradient clipping."""

    lr: float = 6e-4
    """Peak learning rate (after warmup)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to >=2-D weights only (not biases, LayerNorms)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 = no clipping (the norm is still logged)."""
    fused: bool | None = None
    """Fused AdamW kernel; None = on CUDA and CPU (3.5x faster than the per-tensor loop on a CPU)."""
    name: str = "adamw"
    """adamw (every parameter) | muon (torch.optim.Muon for the 2-D matrices inside the blocks,
    AdamW with the settings above for embeddings, LM head, biases and LayerNorm gains; DDP only,
    see docs/DESIGN.md)."""
    muon_lr: float = 0.02
    """Muon's peak learning rate (the hidden matrices); scheduled like optim.lr."""
    muon_momentum: float = 0.95
    """Muon's momentum."""
    muon_nesterov: bool = True
    """Nesterov momentum in Muon."""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations per Muon update."""
    muon_weight_decay: float = 0.0
    """Muon's decoupled weight decay (multiplied by its scheduled learning rate)."""
    muon_adjust_lr: str = "original"
    """Muon's per-matrix learning-rate scale: original (sqrt(max(1, rows/cols)), Keller Jordan) |
    match_rms_adamw (0.2*sqrt(max(rows, cols)), Moonshot: reuse AdamW's lr and decay)."""
    muon_ns_dtype: str = "bf16"
    """Dtype of Muon's Newton-Schulz iteration: bf16 (torch.optim.Muon's, fast on GPUs) | fp32
    (the same algorithm in fp32: DDP then matches one process to fp32 rounding, not bf16's)."""


@dataclass
class ScheduleSection:
    """Learning rate: linear warmup, then cosine (or warmup-stable-decay) down to min_lr_ratio * lr;
    optionally a batch-size warmup. Both are pure functions of the step (pretrain/training/optim.py)."""

    warmup_steps: int = 715
    """Steps of linear warmup from lr/warmup_steps to lr."""
    max_steps: int = 19073
    """Total optimizer steps of the run (the cosine ends here)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of optim.lr."""
    name: str = "cosine"
    """cosine (decay over every step after the warmup) | wsd (warmup-stable-decay: the peak until
    the last schedule.cooldown_frac of the steps, then the cool-down)."""
    cooldown_frac: float = 0.2
    """wsd: fraction of schedule.max_steps spent cooling down (0 < f <= 1, after the warmup)."""
    cooldown: str = "linear"
    """wsd cool-down shape: linear | 1-sqrt (1 - sqrt(progress))."""
    batch_warmup_steps: int = 0
    """Batch-size warmup: over the first N steps the global batch grows from
    schedule.batch_warmup_start_tokens to train.global_batch_tokens in multiples of the start; 0 = off."""
    batch_warmup_start_tokens: int = 0
    """First global batch (tokens) of the batch-size warmup; train.global_batch_tokens must be a multiple of it."""


@dataclass
class TrainSection:
    """The training loop."""

    run_dir: str = "runs/gpt2-124m"
    """Run directory: the resolved config, the metrics log, checkpoints/ (its layout: pretrain/rundir/layout.py)."""
    global_batch_tokens: int = 524288
    """Tokens per optimizer step over all ranks and micro-steps (2**19 for GPT-2 124M)."""
    micro_batch_size: int = 64
    """Sequences per forward/backward on one rank; accumulation makes up the rest."""
    seed: int = 1337
    """Seed of the weight init and of every rank's RNGs."""
    device: str = "auto"
    """auto | cpu | cuda (auto = cuda:LOCAL_RANK when CUDA is available)."""
    compile: bool = True
    """torch.compile the model."""
    dtype: str = "bf16"
    """Compute dtype: bf16 (autocast / FSDP mixed precision) or fp32."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (saves memory, costs ~30% compute)."""
    reuse_host_memory: bool = True
    """Keep freed host memory mapped for the next step instead of returning it to the OS
    (glibc mallopt; a no-op without glibc): a CPU step's large buffers are not page-faulted in
    again every step (W1 eager: 1.81 -> 1.39 s per step). RSS then stays at its peak.
    See pretrain/training/host_memory.py."""
    max_nonfinite_in_a_row: int = 5
    """Abort after this many consecutive steps with a non-finite loss or grad norm (each is skipped)."""
    spike_detection: bool = False
    """Skip the optimizer step when the loss or grad norm spikes above its recent history
    (pretrain/training/spikes.py LossSpikeDetector; the same decision on every rank, saved in checkpoints)."""
    spike_window: int = 100
    """Accepted steps the spike detector compares against; it is armed once the window is full."""
    spike_threshold: float = 6.0
    """A spike is a loss / grad norm above the window's mean + spike_threshold x its std."""
    log_interval: int = 1
    """Print and write metrics every N steps."""
    peak_tflops: float | None = None
    """Dense peak TFLOP/s of one device for MFU, e.g. 989.5 (H100 SXM bf16); None = the table in
    pretrain/training/metrics.py (PEAK_FLOPS) for a known CUDA device, else no MFU. The run report
    says which peak it used."""


@dataclass
class EvalSection:
    """In-loop evaluation (the evaluators themselves live in evals/)."""

    interval: int = 250
    """Evaluate every N steps (and at the last step); 0 = never."""
    val_tokens: int = 10485760
    """Validation tokens per val-loss evaluation (over all ranks); 0 = no val loss."""
    batch_size: int | None = None
    """Eval micro-batch size; None = train.micro_batch_size."""
    hellaswag: bool = True
    """Run HellaSwag (4-way completion accuracy) at each eval."""
    hellaswag_path: str | None = None
    """HellaSwag validation JSONL; None = download the canonical file once (needs internet)."""
    hellaswag_limit: int | None = None
    """Evaluate only the first N HellaSwag examples; None = all."""
    sample_prompt: str = "Hello, I'm a language model,"
    """Prompt of the generated sample logged at each eval; empty = no sample."""
    sample_tokens: int = 32
    """Tokens to generate for the sample."""
    sample_top_k: int = 50
    """Top-k of the sample (1 = greedy)."""
    tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run at each eval (evals/tasks.py), e.g. [lambada_openai, arc_easy];
    logged as tasks/<task>/<metric>. Empty = none. Needs pip install -e '.[lm-eval]'; the tasks'
    data is read when the run starts (hub datasets need the network once, or use eval.tasks_include_path)."""
    tasks_limit: int | None = None
    """Documents per task at each eval (the harness's --limit); None = all."""
    tasks_include_path: str | None = None
    """Directory of local harness task YAMLs (tasks on local data files, offline); None = the harness's own."""
    core: str | None = None
    """DCLM CORE at each eval (evals/core.py): nanochat's eval_bundle directory (core.yaml,
    eval_meta_data.csv, eval_data/; evals/README.md says where to download it); logged as
    core/CORE and core/<task>/acc, core/<task>/centered. None = no CORE."""
    core_limit: int | None = None
    """Items per CORE task at each eval (the first N after the reference's shuffle); the mean is then
    logged as core/mean_centered, not core/CORE. None = all (CORE)."""


@dataclass
class CheckpointSection:
    """Checkpoints (pretrain/checkpoint/)."""

    interval: int = 1000
    """Save every N steps (and at the end); 0 = only at the end."""
    keep_last: int = 3
    """Keep the newest K complete checkpoints."""
    async_save: bool = False
    """Write checkpoints in the background (the next save waits for the previous one)."""
    resume: str = "auto"
    """auto (newest complete checkpoint in run_dir, else fresh) | none (fresh) | a checkpoint PATH."""
    overwrite: bool = False
    """With resume=none: move the previous run in train.run_dir (checkpoints/, the metrics log,
    the config, eval files) aside into one run_dir/overwritten-<date>/ instead of refusing to start."""


@dataclass
class LoggingSection:
    """Where metrics go. The metrics log in the run directory is always written (rank 0)."""

    wandb: str = "disabled"
    """Weights & Biases: online | offline | disabled."""
    wandb_project: str = "gpt2-pretrain"
    """W&B project."""
    wandb_name: str | None = None
    """W&B run name; None = the run directory's name."""
    tensorboard: bool = False
    """Also write TensorBoard event files to run_dir/tensorboard (rank 0): the scalars of
    the metrics log against the step (train/*, val/*, ...) and against tokens seen (by_tokens/*), the
    eval sample as text. Needs the tensorboard package: pip install -e '.[tensorboard]'."""


@dataclass
class DistributedSection:
    """Data parallelism."""

    mode: str = "ddp"
    """ddp (replicated weights) | fsdp (FSDP2 fully_shard per block)."""
    backend: str = "auto"
    """auto (nccl on CUDA, gloo on CPU) | nccl | gloo."""
    timeout_s: int = 600
    """Collective timeout in seconds (a hung rank fails the job after this long)."""


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "schedule": ScheduleSection,
    "train": TrainSection,
    "eval": EvalSection,
    "checkpoint": CheckpointSection,
    "logging": LoggingSection,
    "distributed": DistributedSection,
}

CHOICES: dict[str, tuple[str, ...]] = {
    "train.dtype": ("bf16", "fp32"),
    "train.device": ("auto", "cpu", "cuda"),
    "logging.wandb": ("online", "offline", "disabled"),
    "distributed.mode": ("ddp", "fsdp"),
    "distributed.backend": ("auto", "nccl", "gloo"),
    "optim.name": OPTIMIZERS,
    "optim.muon_adjust_lr": MUON_ADJUST_LR,
    "optim.muon_ns_dtype": NS_DTYPE_NAMES,
    "schedule.name": SCHEDULES,
    "schedule.cooldown": COOLDOWNS,
    "model.preset": tuple(sorted(PRESETS)),
}


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain data (YAML/JSON/torch.save-safe); ``from_dict(to_dict())`` round-trips."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def gpt_config(self) -> GPTConfig:
        return self.model.gpt_config()


# ---------------------------------------------------------------------------------------------
# Field docstrings -> help text
# ---------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal right after each field); the
    model section's architecture fields have GPTConfig's, each with what None means here."""
    if cls is ModelSection:
        arch = {k: f"{v} None = the preset's." for k, v in field_docs(GPTConfig).items()}
        return {**field_docs(_ModelChoice), **arch}
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # the class body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def help_text() -> str:
    """Every key with its default and docstring, section by section (the --help epilog)."""
    lines = ["configuration keys (override with section.key=value):"]
    defaults = Config()
    for name, cls in SECTIONS.items():
        lines.append(f"\n  {name}: {' '.join((cls.__doc__ or '').split())}")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(getattr(defaults, name), f.name)
            lines.append(f"    {name}.{f.name} = {value!r}")
            if f.name in docs:
                lines.extend(textwrap.wrap(docs[f.name], 88, initial_indent=" " * 8, subsequent_indent=" " * 8))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?(inf|nan)$", re.IGNORECASE)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp``, or ConfigError. Lossless conversions only: int -> float, and a
    numeric string -> float (YAML 1.1 reads ``6e-4`` as a string)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {short(value)} ({type(value).__name__})")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {short(value)} ({type(value).__name__})")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {short(value)} ({type(value).__name__})")


def _unknown(key: str, options: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(options))}"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _set(cfg: Config, key: str, value: Any, source: str, raw_string: bool = False) -> None:
    """Set dotted ``key`` to ``value`` with type checking. ``raw_string``: ``value`` came from
    the command line as text; parse it as YAML unless the field is a string."""
    parts = key.split(".")
    all_keys = [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)]
    if len(parts) == 1 and key in SECTIONS:  # 'optim=1': a section given a value
        raise ConfigError(f"'{key}' is a section, not a key; set one of its keys: {key}.KEY=VALUE (e.g. "
                          f"{key}.{dataclasses.fields(SECTIONS[key])[0].name}=...)")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise _unknown(key, all_keys if len(parts) == 2 else list(SECTIONS))
    section_name, name = parts
    cls = SECTIONS[section_name]
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise _unknown(key, all_keys)
    tp = hints[name]
    if raw_string:
        is_str = tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))
        if not (is_str and value.lower() not in ("null", "none", "~")):
            try:
                value = load_yaml(value) if value != "" else ""
            except BoundError as e:
                raise ConfigError(f"{source}: cannot parse the value of {key}: {e}") from None
        if isinstance(value, str) and value.lower() == "none" and type(None) in typing.get_args(tp):
            value = None
    try:
        value = _coerce(value, tp, key)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    setattr(getattr(cfg, section_name), name, value)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    try:
        if p.is_dir():
            raise IsADirectoryError(21, "is a directory")
        text = read_bounded(p, MAX_YAML_BYTES, "config file")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found; pass --config configs/<name>.yaml") from None
    except BoundError as e:
        raise ConfigError(f"{e}; pass --config configs/<name>.yaml") from None
    except OSError as e:  # a directory, no permission
        raise ConfigError(f"{p}: cannot read the config file ({e.strerror or e}); pass --config "
                          "configs/<name>.yaml") from None
    try:
        data = load_yaml(text)
    except BoundError as e:
        raise ConfigError(f"{p}{' ' if str(e).startswith('(') else ': '}{e}") from None
    if data is None:
        raise ConfigError(f"{p}: the config file is empty; it should set at least one section (see configs/), or "
                          "leave out --config to run the defaults (GPT-2 124M)")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a config file is a mapping of sections, got {type(data).__name__}")
    return data


def apply_dict(cfg: Config, data: dict, source: str) -> None:
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: {_unknown(str(section), list(SECTIONS))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {short(values)}")
        for name, value in values.items():
            try:
                _set(cfg, f"{section}.{name}", value, source)
            except ConfigError as e:
                msg = str(e)
                raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg}") from None


def from_dict(data: dict) -> Config:
    cfg = Config()
    apply_dict(cfg, data, "config")
    return cfg


def parse_overrides(cfg: Config, overrides: list[str]) -> None:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"command line: '{item}' is not an override; write section.key=value (e.g. optim.lr=3e-4)"
            )
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value, "command line", raw_string=True)


def world_size_from_env() -> int:
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(int(raw), 1)
    except ValueError:
        raise ConfigError(f"environment: WORLD_SIZE={raw!r} is not an integer") from None


# Numeric bounds, by key (null is allowed where the field allows it: "unset").
POSITIVE = ("data.seq_len", "train.global_batch_tokens", "train.micro_batch_size", "train.log_interval",
            "train.max_nonfinite_in_a_row", "train.spike_threshold", "optim.lr", "optim.eps", "schedule.max_steps",
            "distributed.timeout_s", "checkpoint.keep_last", "eval.sample_top_k", "eval.batch_size",
            "eval.hellaswag_limit", "eval.tasks_limit", "eval.core_limit", "train.peak_tflops")
NONNEGATIVE = ("optim.weight_decay", "optim.grad_clip", "schedule.warmup_steps", "eval.interval", "eval.val_tokens",
               "eval.sample_tokens", "checkpoint.interval")


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def validate(cfg: Config) -> None:
    """Reject impossible values, each in one line naming the key (what depends on the world size
    is checked by the run plan: ``pretrain.plan.batching``)."""
    for key, choices in CHOICES.items():
        v = _get(cfg, key)
        if v not in choices:
            close = difflib.get_close_matches(str(v), choices, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{key}={v!r} must be one of {', '.join(choices)}{hint}")
    for section, cls in SECTIONS.items():  # every float: finite (a NaN passes every comparison below)
        for f in dataclasses.fields(cls):
            v = getattr(getattr(cfg, section), f.name)
            floats = [v] if isinstance(v, float) else [x for x in v if isinstance(x, float)] if isinstance(v, list) else []
            if any(not math.isfinite(x) for x in floats):
                raise ConfigError(f"{section}.{f.name}={v!r} must be a finite number")
    try:
        gpt = cfg.gpt_config
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for key in POSITIVE:
        if _get(cfg, key) is not None and _get(cfg, key) <= 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be > 0")
    for key in NONNEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 0")
    t, d, o, s = cfg.train, cfg.data, cfg.optim, cfg.schedule
    for key in ("train.seed", "data.seed"):  # torch and numpy take seeds in [0, 2**63) (and more, but not both)
        if not 0 <= _get(cfg, key) < 2**63:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be an integer in [0, 2**63)")
    if not d.dir.strip():
        raise ConfigError("data.dir is empty; pass data.dir=DIR (a directory of token shards from gpt2-prepare) or a URL")
    if t.spike_window < 2:
        raise ConfigError(f"train.spike_window={t.spike_window!r} must be >= 2")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas={o.betas!r} must be two numbers in [0, 1)")
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        raise ConfigError(f"schedule.min_lr_ratio={s.min_lr_ratio!r} must be in [0, 1]")
    if d.seq_len > gpt.block_size:
        raise ConfigError(
            f"data.seq_len={d.seq_len} exceeds the model's context model.block_size={gpt.block_size}; "
            f"lower data.seq_len or raise model.block_size"
        )
    if t.global_batch_tokens % d.seq_len:
        raise ConfigError(
            f"train.global_batch_tokens={t.global_batch_tokens} is not a multiple of data.seq_len={d.seq_len}"
        )
    if "://" in d.dir and not d.cache_dir:
        raise ConfigError(f"data.dir={d.dir!r} is a URL: set data.cache_dir to a node-local directory its shards "
                          "are copied into (e.g. data.cache_dir=/local/scratch/gpt2-cache)")
    if d.cache_dir is not None and "://" in d.cache_dir:
        raise ConfigError(f"data.cache_dir={d.cache_dir!r} must be a local directory (node-local disk), not a URL")
    validate_run(cfg)
    validate_optim_schedule(cfg)


def validate_run(cfg: Config) -> None:
    """The run's settings that name other things: starting weights, eval tasks, resume (what this
    machine has -- CUDA, the optional packages -- is the run plan's check)."""
    if cfg.model.init_from is not None and not cfg.model.init_from.strip():
        raise ConfigError("model.init_from is empty; pass null (random init), a hub name or a path")
    validate_tasks(cfg)
    validate_core(cfg)
    r = cfg.checkpoint.resume
    if r not in ("auto", "none") and not r:
        raise ConfigError("checkpoint.resume must be auto, none or a checkpoint path")
    if cfg.checkpoint.overwrite and r != "none":
        raise ConfigError(
            f"checkpoint.overwrite=true moves a previous run aside for a fresh start, but checkpoint.resume={r} "
            "continues one; pass --resume none with it, or drop checkpoint.overwrite"
        )


def validate_tasks(cfg: Config) -> None:
    """eval.tasks: names, the optional package, the tokenizer the harness's prompts need, the task
    directory. The task definitions and their data are read by the evaluator when the run starts."""
    e = cfg.eval
    if not e.tasks:
        return
    if any(not t.strip() for t in e.tasks):
        raise ConfigError(f"eval.tasks={e.tasks!r} holds an empty name; list harness task names, e.g. [lambada_openai]")
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("eval.tasks needs lm-evaluation-harness, which is not installed; pip install -e '.[lm-eval]' "
                          "(or pip install 'lm-eval>=0.4.13,<0.5'), or set eval.tasks=[]")
    if cfg.gpt_config.vocab_size < 50257:
        raise ConfigError(f"eval.tasks: the harness's prompts are GPT-2 BPE text (50257 ids) but model.vocab_size is "
                          f"{cfg.gpt_config.vocab_size}; train with the GPT-2 vocabulary or set eval.tasks=[]")
    if e.tasks_include_path is not None and not Path(e.tasks_include_path).exists():
        raise ConfigError(f"eval.tasks_include_path={e.tasks_include_path!r} does not exist; pass a directory of "
                          "harness task YAMLs or null")


def validate_core(cfg: Config) -> None:
    """eval.core: the bundle directory and its core.yaml exist, and the model reads GPT-2 BPE text.
    The bundle's tasks and items are read and checked by the evaluator when the run starts."""
    e = cfg.eval
    if e.core is None:
        if e.core_limit is not None:
            raise ConfigError(f"eval.core_limit={e.core_limit} without eval.core; set eval.core to the eval_bundle "
                              "directory, or drop eval.core_limit")
        return
    if not Path(e.core).is_dir() or not (Path(e.core) / "core.yaml").is_file():
        raise ConfigError(f"eval.core={e.core!r} is not a CORE bundle directory (core.yaml, eval_meta_data.csv, "
                          "eval_data/); pass nanochat's eval_bundle (evals/README.md) or null")
    if cfg.gpt_config.vocab_size < 50257:
        raise ConfigError(f"eval.core: the CORE prompts are GPT-2 BPE text (50257 ids) but model.vocab_size is "
                          f"{cfg.gpt_config.vocab_size}; train with the GPT-2 vocabulary or set eval.core=null")


def validate_optim_schedule(cfg: Config) -> None:
    """The optimizer / schedule choices (optim.name, schedule.name, batch-size warmup)."""
    o, s, t = cfg.optim, cfg.schedule, cfg.train
    if o.name == "muon":
        if cfg.distributed.mode == "fsdp":
            raise ConfigError(
                "optim.name=muon needs whole weight matrices (Newton-Schulz orthogonalises each one) but "
                "distributed.mode=fsdp shards them across ranks; use distributed.mode=ddp with Muon"
            )
        for key, v in (("optim.muon_lr", o.muon_lr), ("optim.muon_momentum", o.muon_momentum),
                       ("optim.muon_weight_decay", o.muon_weight_decay)):
            if not math.isfinite(v) or v < 0 or (key == "optim.muon_lr" and v == 0):
                raise ConfigError(f"{key}={v!r} must be a finite number {'> 0' if key == 'optim.muon_lr' else '>= 0'}")
        if not 1 <= o.muon_ns_steps < 100:
            raise ConfigError(f"optim.muon_ns_steps={o.muon_ns_steps!r} must be in [1, 100)")
    if s.name == "wsd":
        if not (math.isfinite(s.cooldown_frac) and 0.0 < s.cooldown_frac <= 1.0):
            raise ConfigError(f"schedule.cooldown_frac={s.cooldown_frac!r} must be in (0, 1]")
        if cooldown_start(s.max_steps, s.cooldown_frac) < s.warmup_steps:
            raise ConfigError(
                f"schedule.cooldown_frac={s.cooldown_frac} starts the cool-down at step "
                f"{cooldown_start(s.max_steps, s.cooldown_frac)}, inside the warmup (schedule.warmup_steps="
                f"{s.warmup_steps}); lower the cool-down fraction or the warmup"
            )
    if s.warmup_steps > s.max_steps:
        raise ConfigError(f"schedule.warmup_steps={s.warmup_steps} is longer than the run (schedule.max_steps="
                          f"{s.max_steps}): the peak learning rate would never be reached; lower the warmup")
    if s.batch_warmup_steps < 0:
        raise ConfigError(f"schedule.batch_warmup_steps={s.batch_warmup_steps!r} must be >= 0")
    if s.batch_warmup_steps > s.max_steps:
        raise ConfigError(f"schedule.batch_warmup_steps={s.batch_warmup_steps} is longer than the run "
                          f"(schedule.max_steps={s.max_steps}): the full batch would never be reached; lower it")
    if s.batch_warmup_steps > 0:
        start = s.batch_warmup_start_tokens
        if start <= 0 or start > t.global_batch_tokens or t.global_batch_tokens % start:
            raise ConfigError(
                f"schedule.batch_warmup_start_tokens={start!r} must be > 0 and divide "
                f"train.global_batch_tokens={t.global_batch_tokens}"
            )


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """defaults < YAML at ``path`` < ``overrides``; validated. The numbers derived from it (and
    the world size) are the run plan's: ``pretrain.plan.make_plan``."""
    cfg = Config()
    if path is not None:
        apply_dict(cfg, read_yaml(path), str(path))
    parse_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg
