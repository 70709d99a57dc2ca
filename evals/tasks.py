"""lm-evaluation-harness tasks on the project's model in memory: the ``gpt2-eval --tasks`` runner,
the in-loop evaluator (``eval.tasks``) and GPT-2 124M's published figures to compare with.

    results = run_tasks(model, ["lambada_openai", "arc_easy"], limit=100)   # the harness's results dict
    flat = flatten(results)                  # {"tasks/arc_easy/acc": ..., "tasks/arc_easy/acc_stderr": ...}
    TaskEvaluator(["arc_easy"], limit=200)(model, step)                     # in the training loop

The harness (``lm-eval``, the optional extra ``.[lm-eval]``) is used as a library: its task
definitions, prompts, few-shot sampling, metrics and aggregation; only the model is ours
(``evals/harness.py`` ``GPTLM``). This module imports ``lm_eval`` only when a task runs, so the
rest of the project works without it; :func:`missing` says what to install.

Task names are the harness's (``lm_eval --tasks list``); ``include_path`` adds local YAML task
definitions (a directory or file), which is how a task runs offline on a local data file
(``evals/lm_eval_task/hellaswag_local.yaml`` is one). When every requested name is found under
``include_path`` the harness's ~15k built-in definitions are not indexed (5 s saved).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

INSTALL_HINT = "pip install -e '.[lm-eval]' (or pip install 'lm-eval>=0.4.13,<0.5')"
DEFAULT_BOOTSTRAP_ITERS = 100_000  # the harness CLI's: the standard errors of bootstrapped metrics

# OpenAI GPT-2 124M (openai-community/gpt2) in lm-evaluation-harness, as published; evals/README.md
# has the table with the sources. Key: (task, metric, num_fewshot) -> (value, source).
REFERENCE: dict[tuple[str, str, int], tuple[float, str]] = {
    ("hellaswag", "acc", 0): (0.2892, "build-nanogpt hellaswag.py docstring (Eleuther harness; version not stated)"),
    ("hellaswag", "acc_norm", 0): (0.3114, "build-nanogpt hellaswag.py docstring (Eleuther harness; version not stated)"),
    ("lambada_openai", "acc", 0): (0.3256, "lm-evaluation-harness issue #2159 (2024-07-30, main at the time)"),
    ("lambada_openai", "perplexity", 0): (40.0554, "lm-evaluation-harness issue #2159 (2024-07-30, main at the time)"),
    ("hellaswag", "acc_norm", 10): (0.3153, "openai-community/gpt2 model card: Open LLM Leaderboard v1"),
    ("arc_challenge", "acc_norm", 25): (0.2201, "openai-community/gpt2 model card: Open LLM Leaderboard v1"),
    ("core", "CORE", 0): (0.1139, "nanochat (CORE of openai-community/gpt2, scripts/base_eval.py)"),
}

# OpenAI GPT-2's CORE (DCLM's 22-task ensemble, evals/core.py ``core/CORE``) at each size, as nanochat
# reports them (scripts/base_eval.py on openai-community/gpt2, -medium, -large, -xl; dev/LEADERBOARD.md
# gives the 1.5B model's as 0.256525). The 124M figure is also REFERENCE's ("core", "CORE", 0).
CORE_REFERENCE: dict[str, float] = {"124M": 0.1139, "355M": 0.1849, "774M": 0.2146, "1.5B": 0.2565}
CORE_SOURCE = "karpathy/nanochat, scripts/base_eval.py on OpenAI's GPT-2 checkpoints"


def core_reference_line() -> str:
    """'OpenAI GPT-2 CORE: 124M 0.1139, 355M 0.1849, ... (source)', for reports."""
    sizes = ", ".join(f"{k} {v:.4f}" for k, v in CORE_REFERENCE.items())
    return f"OpenAI GPT-2 CORE: {sizes} ({CORE_SOURCE})"


class TaskError(ValueError):
    """Tasks that cannot run (unknown name, unreadable data, lm-eval missing): one line, the fix."""


def missing() -> str | None:
    """The one line to print when lm-eval is not installed, else None."""
    if importlib.util.find_spec("lm_eval") is None:
        return f"lm-evaluation-harness is not installed; {INSTALL_HINT}"
    return None


def _quiet() -> None:
    """The harness logs every request batch at INFO; keep its warnings."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None):
    """A harness ``TaskManager`` that knows ``tasks``: ``include_path`` alone when it defines them
    all, else with the built-in definitions too. Unknown names raise :class:`TaskError`."""
    problem = missing()
    if problem:
        raise TaskError(problem)
    if include_path is not None and not Path(include_path).exists():
        raise TaskError(f"--include-path {include_path}: no such file or directory; pass a directory of task YAMLs")
    if include_path is not None:
        check_task_yamls(Path(include_path))
    _refuse_unnamed(tasks, include_path)  # before the harness is imported (~1 s) and indexes (~5 s)
    _quiet()
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        tm = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in tm.all_tasks for t in tasks):
            return tm
    tm = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in tm.all_tasks and not Path(t).is_file()]
    if unknown:
        raise TaskError(f"unknown task {unknown[0]!r}; list the harness's tasks with `lm_eval ls tasks`, or pass "
                        "--include-path DIR holding its YAML definition")
    return tm


MAX_TASK_YAMLS = 2_000  # local task definitions: a handful; more is the wrong directory


def check_task_yamls(root: Path) -> None:
    """Every task YAML under ``root`` read through the project's bounded loader
    (``pretrain.values.load_yaml``: size, alias expansion, duplicate keys) before the harness
    parses it: a malformed or oversized definition is named as such, in one line, not reported as
    an unknown task (or expanded without bound)."""
    from pretrain.values import MAX_YAML_BYTES, BoundError, load_yaml, read_bounded

    paths = sorted(root.rglob("*.yaml")) if root.is_dir() else [root]
    if len(paths) > MAX_TASK_YAMLS:
        raise TaskError(f"--include-path {root}: {len(paths):,} YAML files (at most {MAX_TASK_YAMLS:,}); pass the "
                        "directory of your task definitions")
    for path in paths:
        try:
            load_yaml(read_bounded(path, MAX_YAML_BYTES, "task YAML"), app_tags=True)
        except BoundError as e:
            said = str(e).removeprefix(f"{path}: ")
            raise TaskError(f"{path}: malformed task YAML ({said}); fix it (a task definition is a mapping of "
                            "plain keys)") from None
        except OSError as e:
            raise TaskError(f"{path}: cannot read the task YAML ({e.strerror or e})") from None


def _refuse_unnamed(tasks: Sequence[str], include_path: str | Path | None) -> None:
    """Refuse at once a name that no task YAML mentions: the harness builds its index from the
    YAML files alone, so such a name cannot be a task, group or tag (a quick byte search, ~0.2 s,
    instead of the ~5 s index; a name the search does find is judged by the index). The package is
    located, not imported; the user's directory is searched first."""
    harness = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0])
    roots = ([Path(include_path)] if include_path is not None else []) + [harness / "tasks"]
    names = {t: t.encode() for t in tasks if not Path(t).is_file()}
    for root in roots:
        for path in (root.rglob("*.yaml") if root.is_dir() else [root]):
            if not names:
                return
            data = path.read_bytes()
            names = {t: b for t, b in names.items() if b not in data}
    if names:
        raise TaskError(f"unknown task {next(iter(names))!r}; list the harness's tasks with `lm_eval ls tasks`, or "
                        "pass --include-path DIR holding its YAML definition")


def hub_unreachable(timeout_s: float = 3.0) -> bool:
    """True when the Hugging Face Hub cannot be reached from here (no route, no DNS): one TCP
    connection, at most ``timeout_s``. False when unsure (a proxy is configured, or already offline)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
    except OSError:
        return True
    return False


class _Offline:
    """The Hub and datasets in offline mode (the cache only) while a task loads: an unreachable
    Hub then fails at once instead of after a minute of retries."""

    def __enter__(self):
        import datasets.config
        import huggingface_hub.constants

        self.saved = [(m, k, getattr(m, k)) for m, k in ((huggingface_hub.constants, "HF_HUB_OFFLINE"),
                                                         (datasets.config, "HF_HUB_OFFLINE"),
                                                         (datasets.config, "HF_DATASETS_OFFLINE")) if hasattr(m, k)]
        for m, k, _ in self.saved:
            setattr(m, k, True)
        return self

    def __exit__(self, *exc):
        for m, k, v in self.saved:
            setattr(m, k, v)


def load_tasks(tm, tasks: Sequence[str]) -> dict:
    """The harness's task objects (datasets read now: a missing file or an offline hub download
    fails here, in one line; with the Hub unreachable, at once, from the cache only)."""
    from contextlib import nullcontext

    import datasets

    offline = hub_unreachable()
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" on a first load: not the command's output
    try:
        with _Offline() if offline else nullcontext():
            return tm.load(list(tasks))
    except Exception as e:  # datasets/fsspec/hub errors have many types; the message says which file
        first = " ".join((str(e).strip().splitlines() or [type(e).__name__])[0].split())[:160]
        said = "the Hugging Face Hub cannot be reached from here and the dataset is not in the cache; " if offline else ""
        raise TaskError(f"tasks {','.join(tasks)}: cannot load ({type(e).__name__}: {first}); {said}check the "
                        "task's dataset (offline: a local data file through --include-path)") from None
    finally:
        if bars:
            datasets.enable_progress_bars()


def check_fewshot(loaded: dict, num_fewshot: int | None) -> None:
    """Every task can draw its few-shot examples: K (``--num-fewshot``, else the task's own
    ``num_fewshot``) from its few-shot pool, which the harness samples without replacement
    (K + 1 when the pool is the split scored, to leave the scored document out); a
    :class:`TaskError` naming the task, its pool and the largest K, else (the harness's own
    refusal is a ValueError traceback from ``random.sample``)."""
    for name, task in loaded.get("tasks", {}).items():
        own = getattr(getattr(task, "config", None), "num_fewshot", None)
        k = num_fewshot if num_fewshot is not None else own
        if not isinstance(k, int) or k <= 0:
            continue
        sampler = getattr(task, "sampler", None)
        pool = len(sampler.fewshot_docs()) if sampler is not None else 0
        same = getattr(getattr(task, "fewshot_cfg", None), "split", None) == task.config.test_split
        most = max(pool - int(same), 0)
        if k > most:
            said = f"--num-fewshot {k}" if num_fewshot is not None else f"task {name!r} asks for num_fewshot {k} (its YAML)"
            where = f"{name!r} has {pool} few-shot example(s)" + (" in the split it scores, less the one scored" if same else "")
            raise TaskError(f"{said}: {where}; pass --num-fewshot {most} or fewer")


class _Loaded:
    """A harness ``TaskManager`` whose ``load`` of the task list :func:`load_tasks` already loaded
    returns those task objects: ``simple_evaluate`` loads its list through ``task_manager.load``
    itself, which read every dataset a second time (and outside :func:`load_tasks`' offline
    handling). Any other list, and every other attribute, is the manager's."""

    def __init__(self, manager, tasks: Sequence[str], loaded: dict) -> None:
        self.manager, self.tasks, self.loaded = manager, list(tasks), loaded

    def load(self, tasks):
        return self.loaded if list(tasks) == self.tasks else self.manager.load(tasks)

    def __getattr__(self, name: str):
        return getattr(self.manager, name)


def run_tasks(model, tasks: Sequence[str], *, include_path: str | Path | None = None, limit: int | float | None = None,
              num_fewshot: int | None = None, batch_size: int = 32, device=None,
              bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS, manager=None, loaded: dict | None = None, lm=None,
              log_samples: bool = False, fork_bootstrap: bool = False) -> dict | None:
    """The harness's results dict (``lm_eval.simple_evaluate``: ``results``, ``versions``,
    ``n-shot``, ``n-samples``, ``config``, ...) for ``model`` on ``tasks``; None on ranks other
    than 0 (the harness gathers there). Python's and NumPy's global RNG states are restored after
    (the harness seeds them; torch's is the caller's: the trainer evaluates under ``fork_rng``).
    ``fork_bootstrap``: let the harness bootstrap standard errors in a ``multiprocessing.Pool`` as
    its CLI does (``gpt2-eval``); off (in this process) for a trainer, see below. ``loaded``: what
    ``load_tasks(manager, tasks)`` returned, handed to the harness instead of loading the tasks
    again (the same task objects on every call: the harness reseeds their few-shot sampling each time)."""
    tm = manager if manager is not None else task_manager(tasks, include_path)
    if loaded is not None:
        tm = _Loaded(tm, tasks, loaded)
    _quiet()
    import lm_eval

    from evals.harness import GPTLM

    lm = lm if lm is not None else GPTLM(model, batch_size=batch_size, device=device)
    py_state, np_state = random.getstate(), np.random.get_state()
    # The harness bootstraps standard errors in a multiprocessing.Pool: forked copies of this process
    # (a trainer's threads, process group and CUDA context, its SIGTERM handler, which makes them
    # survive the pool's terminate() holding its stdout) -- so in this process, one at a time.
    multiproc = os.environ.get("DISABLE_MULTIPROC")
    if not fork_bootstrap:
        os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit,
                                       num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                       log_samples=log_samples)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        if multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = multiproc


def flatten(results: dict | None, prefix: str = "tasks/") -> dict[str, float]:
    """``tasks/<task>/<metric>`` (and ``..._stderr``) from a harness results dict: the numbers of
    ``results[task]["<metric>,<filter>"]``; a filter other than ``none`` is kept as
    ``<metric>[<filter>]``. Non-numbers (the harness's "N/A" stderr) are left out."""
    out: dict[str, float] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metric.endswith("_stderr")
            base = metric.removesuffix("_stderr")
            name = base if filt == "none" else f"{base}[{filt}]"  # acc; exact_match[strict-match]
            name += "_stderr" if stderr else ""
            out[f"{prefix}{task}/{name}"] = float(value)
    return out


def reference_rows(results: dict | None) -> list[tuple[str, str, int, float, float, str]]:
    """(task, metric, n-shot, ours, GPT-2 124M's, source) for every figure of ``results`` that the
    reference table holds for the same task, metric and number of few-shot examples."""
    rows = []
    res = (results or {}).get("results", {})
    for task, metrics in res.items():
        shots = int((results.get("n-shot") or {}).get(task, 0) or 0)
        for key, value in metrics.items():
            metric = key.split(",", 1)[0]
            ref = REFERENCE.get((task, metric, shots))
            if ref is not None and key.endswith(",none") and isinstance(value, (int, float)):
                rows.append((task, metric, shots, float(value), ref[0], ref[1]))
    return rows


def format_reference(rows) -> str:
    if not rows:
        return ""
    lines = [f"{'task':16s} {'metric':11s} {'shots':>5s} {'ours':>9s} {'GPT-2 124M':>10s}  source"]
    for task, metric, shots, ours, ref, src in rows:
        lines.append(f"{task:16s} {metric:11s} {shots:5d} {ours:9.4f} {ref:10.4f}  {src}")
    return "\n".join(lines)


class TaskEvaluator:
    """In-loop harness tasks (``eval.tasks``): built once (task definitions and their data read,
    so a bad name or file stops the run before the model is built), then
    ``evaluator(model, step) -> {"tasks/<task>/<metric>": ...}`` on every rank together; the
    harness splits the documents over the ranks and gathers the metrics, and every rank returns
    rank 0's dict."""

    name = "tasks"

    def __init__(self, tasks: Sequence[str], limit: int | None = None, batch_size: int = 32, device=None,
                 include_path: str | Path | None = None, bootstrap_iters: int = 1000, fsdp: bool = False,
                 world_size: int = 1) -> None:
        self.tasks, self.limit, self.batch_size, self.device = list(tasks), limit, batch_size, device
        self.bootstrap_iters = bootstrap_iters
        self.manager = task_manager(self.tasks, include_path)
        self.loaded = load_tasks(self.manager, self.tasks)  # read once: every evaluation runs these
        check_fewshot(self.loaded, None)  # a task YAML's own num_fewshot beyond its pool: now, not at the first eval
        generative = [n for n, t in self.loaded["tasks"].items() if t.OUTPUT_TYPE == "generate_until"]
        if fsdp and world_size > 1 and generative:
            # Rows stop generating at different steps on different ranks; FSDP needs every rank in every forward.
            raise TaskError(f"eval.tasks: {generative[0]} generates text, which FSDP cannot split over ranks; "
                            "use distributed.mode=ddp or leave generative tasks to gpt2-eval after training")

    def __call__(self, model, step: int | None = None) -> dict[str, Any]:
        from evals.common import eval_mode
        from pretrain import dist

        with eval_mode(model):
            results = run_tasks(model, self.tasks, limit=self.limit, batch_size=self.batch_size, device=self.device,
                                bootstrap_iters=self.bootstrap_iters, manager=self.manager, loaded=self.loaded)
        flat = flatten(results) if results is not None else None
        return dist.all_gather_object(flat, "tasks results")[0]
