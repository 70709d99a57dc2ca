"""CORE (DCLM, arXiv 2406.11794): the mean over in-context tasks of the centred accuracy
``(acc - baseline) / (1 - baseline)``, scored as nanochat scores it.

    gpt2-eval --model CKPT --core eval_bundle [--limit N]
    gpt2-train ... eval.core=eval_bundle [eval.core_limit=N]     # logged as core/... at each eval

The bundle is nanochat's ``eval_bundle`` (evals/README.md says where to download it; nothing here
uses the network): ``core.yaml`` (``icl_tasks``: ``label``, ``dataset_uri``, ``num_fewshot`` (a
list, its first entry used), ``icl_task_type``, ``continuation_delimiter`` (default ``" "``)),
``eval_meta_data.csv`` (``Eval Task``, ``Random baseline`` in percent) and ``eval_data/<dataset_uri>``
(llm-foundry's ICL jsonl: multiple_choice ``{query, choices, gold}``, schema ``{context_options,
continuation, gold}``, language_modeling ``{context, continuation}``).

The scoring is the reference's, rule by rule (``scripts/base_eval.py`` ``evaluate_model`` and
``nanochat/core_eval.py`` of karpathy/nanochat):

- each task's items are shuffled with ``random.Random(1337)``; a limit takes the first N after it,
  and the few-shot draw indexes this (limited) list (``evaluate_model``);
- item ``idx``'s few-shot examples: ``random.Random(1234 + idx).sample`` of the other indices
  (``evaluate_example``);
- prompts (``render_prompts_mc`` / ``_schema`` / ``_lm``, Jinja templates written out here): each
  shot ``A + delimiter + B + "\\n\\n"``, then the item; multiple choice: ``query + delim + choice``
  per choice, the shots' answer ``choices[gold]``; schema: ``option + delim + continuation`` per
  context option, the shots' ``context_options[gold]``; language modelling: contexts stripped
  (``| trim``), and the prompt without the continuation stripped again;
- tokens: BOS (GPT-2's ``<|endoftext|>``, as nanochat's ``get_bos_token_id``) + the prompt
  (``encode_ordinary``); the scored continuation starts after the common token prefix of the
  choices (multiple choice), before the common suffix of the options (schema), after the tokens
  of the prompt without the continuation (language modelling, which must be a prefix: else the
  item is refused, where the reference asserts) (``batch_sequences_*``, ``find_common_length``);
- sequences longer than the model's context keep their last ``block_size`` tokens, the indices
  shifted (``evaluate_example``); a continuation that does not fit is refused in one line;
- multiple choice and schema predict the choice with the lowest mean loss over its continuation
  tokens (``list.index(min(...))``: the first on ties; an empty continuation's mean, or one with no
  token before it, is NaN there, and here); language modelling is right when every continuation
  token is the argmax;
- items are split ``idx = rank, rank + world_size, ...`` and the counts all-reduced
  (``evaluate_task``); centred accuracy ``(acc - 0.01 b) / (1 - 0.01 b)`` with ``b`` the task's
  ``Random baseline``; CORE is their mean over the tasks.

The forwards go through ``evals.hellaswag.score_sequences`` (batched: the choices of an item share
their prompt's forward on the shared-prefix path; packed, fixed-shape batches for compiled and
FSDP models), so the decisions equal the reference's up to float summation order.

With a limit the mean of the centred accuracies is reported as ``core/mean_centered``, not
``core/CORE``: CORE is defined on every item.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from evals.common import eval_mode
from evals.hellaswag import EvalStopped, model_block_size, model_vocab_size, score_sequences
from pretrain import dist

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FIELDS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
          "language_modeling": ("context", "continuation")}
SHUFFLE_SEED, FEWSHOT_SEED = 1337, 1234  # nanochat scripts/base_eval.py, nanochat/core_eval.py
BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's eval_bundle
ITEMS_PER_CALL = 512  # items scored per score_sequences call (bounds the token lists held at once)


class CoreError(ValueError):
    """A bundle or item that cannot be scored: one line naming the file and what is expected."""


@dataclass
class CoreTask:
    """One task of the bundle: its items shuffled (and limited) as the reference does."""

    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    baseline: float  # the csv's "Random baseline", in percent
    path: Path
    items: list[dict] = field(default_factory=list)
    total: int = 0  # items in the file, before a limit


def _scalar_text(v, where: str, name: str) -> str:
    """A field as the reference's Jinja template renders it (``str(v)``); objects, lists and null refused."""
    if isinstance(v, (str, int, float)):
        return str(v)
    raise CoreError(f"{where}: field {name!r} must be text, got {type(v).__name__}")


def _check_item(item, task_type: str, where: str) -> dict:
    """The fields of one jsonl line for its task type, as text (gold as an int index)."""
    if not isinstance(item, dict):
        raise CoreError(f"{where}: expected a JSON object with {list(FIELDS[task_type])}, got {type(item).__name__}")
    for name in FIELDS[task_type]:
        if name not in item:
            raise CoreError(f"{where}: missing field {name!r}; a {task_type} line needs {list(FIELDS[task_type])}")
    out = dict(item)
    options = {"multiple_choice": "choices", "schema": "context_options"}.get(task_type)
    for name in FIELDS[task_type]:
        if name == options:
            if not isinstance(item[name], list) or not item[name]:
                raise CoreError(f"{where}: field {name!r} must be a non-empty list of texts")
            out[name] = [_scalar_text(v, where, name) for v in item[name]]
        elif name != "gold":
            out[name] = _scalar_text(item[name], where, name)
    if options is not None:
        gold = item["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(out[options]):
            raise CoreError(f"{where}: 'gold' must be an index into {options!r} (0..{len(out[options]) - 1}), "
                            f"got {gold!r}")
    return out


def _read_items(path: Path, task_type: str) -> list[dict]:
    if not path.is_file():
        raise CoreError(f"{path}: task file not found; core.yaml's dataset_uri names a file under eval_data/ "
                        f"(a {task_type} jsonl)")
    items = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                items.append(_check_item(json.loads(raw.decode("utf-8").strip()), task_type, where))
            except UnicodeDecodeError:
                raise CoreError(f"{where}: not UTF-8 text; the task files are UTF-8 jsonl") from None
            except json.JSONDecodeError as e:
                raise CoreError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); expected one "
                                f"{task_type} object per line") from None
    if not items:
        raise CoreError(f"{path}: no items; expected {task_type} jsonl lines")
    return items


def _baselines(csv_path: Path) -> dict[str, float]:
    """``Eval Task`` -> ``Random baseline`` (percent), the first row of a label (as pandas' ``.values[0]``)."""
    if not csv_path.is_file():
        raise CoreError(f"{csv_path}: not found; the bundle needs eval_meta_data.csv with the columns "
                        "'Eval Task' and 'Random baseline' (percent)")
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "Eval Task" not in rows[0] or "Random baseline" not in rows[0]:
        raise CoreError(f"{csv_path}: expected the columns 'Eval Task' and 'Random baseline' (percent)")
    out: dict[str, float] = {}
    for n, row in enumerate(rows, 2):
        try:
            out.setdefault(row["Eval Task"], float(row["Random baseline"]))
        except (TypeError, ValueError):
            raise CoreError(f"{csv_path}:{n}: 'Random baseline' of {row['Eval Task']!r} is "
                            f"{row['Random baseline']!r}, not a number (percent)") from None
    return out


def _task_entry(t, where: str, baselines: dict[str, float], csv_path: Path, data_dir: Path) -> CoreTask:
    if not isinstance(t, dict) or not all(k in t for k in ("label", "dataset_uri", "icl_task_type", "num_fewshot")):
        raise CoreError(f"{where}: each icl_tasks entry needs label, dataset_uri, icl_task_type and num_fewshot")
    label, kind = str(t["label"]), t["icl_task_type"]
    if kind not in TASK_TYPES:
        raise CoreError(f"{where}: task {label!r} has icl_task_type {kind!r}; expected one of {', '.join(TASK_TYPES)}")
    shots = t["num_fewshot"][0] if isinstance(t["num_fewshot"], list) and t["num_fewshot"] else t["num_fewshot"]
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise CoreError(f"{where}: task {label!r} has num_fewshot {t['num_fewshot']!r}; expected [K] with K >= 0")
    if label not in baselines:
        raise CoreError(f"{csv_path}: no 'Random baseline' for task {label!r} (core.yaml); add a row whose "
                        "'Eval Task' is the label")
    if not 0 <= baselines[label] < 100:
        raise CoreError(f"{csv_path}: 'Random baseline' of {label!r} is {baselines[label]}; expected a percent in [0, 100)")
    delim = t.get("continuation_delimiter", " ")
    return CoreTask(label, kind, shots, delim if isinstance(delim, str) else str(delim), baselines[label],
                    data_dir / str(t["dataset_uri"]))


def read_bundle(bundle: str | os.PathLike) -> list[CoreTask]:
    """The tasks of ``core.yaml`` with their baselines, checked; no task file is read yet."""
    from pretrain.values import MAX_YAML_BYTES, BoundError, load_yaml, read_bounded

    root = Path(bundle)
    if not root.is_dir():
        raise CoreError(f"{root}: no such bundle directory; pass nanochat's eval_bundle (core.yaml, "
                        f"eval_meta_data.csv, eval_data/), downloaded from {BUNDLE_URL}")
    cfg_path = root / "core.yaml"
    if not cfg_path.is_file():
        raise CoreError(f"{cfg_path}: not found; the bundle directory needs core.yaml (icl_tasks: label, "
                        "dataset_uri, num_fewshot, icl_task_type)")
    try:  # the project's one bounded YAML loader (size, alias expansion, duplicate keys)
        cfg = load_yaml(read_bounded(cfg_path, MAX_YAML_BYTES, "core.yaml"))
    except BoundError as e:
        raise CoreError(f"{cfg_path}: not valid YAML ({str(e).removeprefix(f'{cfg_path}: ')})") from None
    except OSError as e:
        raise CoreError(f"{cfg_path}: cannot read it ({e.strerror or e})") from None
    tasks = cfg.get("icl_tasks") if isinstance(cfg, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise CoreError(f"{cfg_path}: expected a non-empty list under 'icl_tasks'")
    baselines = _baselines(root / "eval_meta_data.csv")
    out = [_task_entry(t, f"{cfg_path} (icl_tasks[{i}])", baselines, root / "eval_meta_data.csv", root / "eval_data")
           for i, t in enumerate(tasks)]
    labels = [t.label for t in out]
    if len(set(labels)) != len(labels):
        raise CoreError(f"{cfg_path}: task labels repeat ({sorted({x for x in labels if labels.count(x) > 1})}); "
                        "each label names one task")
    return out


def load_bundle(bundle: str | os.PathLike, limit: int | None = None) -> list[CoreTask]:
    """Every task with its items read, checked, shuffled with ``random.Random(1337)`` and cut to
    the first ``limit``; a :class:`CoreError` in one line on the first problem."""
    if limit is not None and limit < 1:
        raise CoreError(f"limit {limit}: nothing to score; pass N >= 1 items per task (or no limit: CORE)")
    tasks = read_bundle(bundle)
    for task in tasks:
        items = _read_items(task.path, task.task_type)
        random.Random(SHUFFLE_SEED).shuffle(items)  # base_eval.py: shuffle, then crop to max_per_task
        task.total, task.items = len(items), items[:limit] if limit else items
        if task.num_fewshot > len(task.items) - 1:
            have = f"the first {len(task.items)} of its items" if limit else f"{len(task.items)} items"
            raise CoreError(f"{task.path}: task {task.label!r} draws {task.num_fewshot} few-shot examples from the "
                            f"other items but has {have}; " + ("raise the limit" if limit else "add items"))
    return tasks


# --------------------------------------------------------------------------- prompts and tokens


def fewshot(items: Sequence[dict], idx: int, k: int) -> list[dict]:
    """Item ``idx``'s examples: ``random.Random(1234 + idx).sample`` of the other indices (core_eval.py)."""
    if k <= 0:
        return []
    rng = random.Random(FEWSHOT_SEED + idx)
    return [items[i] for i in rng.sample([i for i in range(len(items)) if i != idx], k)]


def render(task_type: str, item: dict, delim: str, shots: Sequence[dict]) -> list[str]:
    """The prompts of ``render_prompts_mc`` / ``_schema`` / ``_lm`` (core_eval.py), their Jinja
    templates written out; language modelling gives [without, with] the continuation."""
    if task_type == "multiple_choice":
        head = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
        return [f"{head}{item['query']}{delim}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        head = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in shots)
        return [f"{head}{option}{delim}{item['continuation']}" for option in item["context_options"]]
    head = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in shots)
    without = f"{head}{item['context'].strip()}{delim}"
    return [without.strip(), without + item["continuation"]]


def common_length(seqs: Sequence[Sequence[int]], from_end: bool = False) -> int:
    """Tokens the sequences share at the start (or the end), at most the shortest's length
    (``find_common_length``)."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        j = -1 - i if from_end else i
        if any(s[j] != seqs[0][j] for s in seqs):
            return i
    return n


def item_rows(task: CoreTask, token_lists: list[list[int]], idx: int, block_size: int) -> list[tuple[np.ndarray, int]]:
    """(tokens, continuation start) per scored row of item ``idx`` from its prompts' tokens (BOS
    first), cropped from the left to ``block_size`` (``batch_sequences_*``, ``evaluate_example``)."""
    if task.task_type == "multiple_choice":
        start = common_length(token_lists)
        rows = [(t, start) for t in token_lists]
    elif task.task_type == "schema":
        suffix = common_length(token_lists, from_end=True)
        rows = [(t, len(t) - suffix) for t in token_lists]
    else:
        without, with_ = token_lists
        if not len(without) < len(with_) or with_[:len(without)] != without:
            raise CoreError(f"{task.path}: item {idx} of task {task.label!r} (after the shuffle): the tokens of the "
                            "prompt without its continuation are not a prefix of those with it; check its context")
        rows = [(with_, len(without))]
    out = []
    for toks, start in rows:
        crop = max(0, len(toks) - block_size)
        # The reference asserts start - crop >= 0; at 0 (no token before the continuation) its mean loss
        # slice is empty: NaN for a choice (kept, not scored, as here), a shape error for language modelling.
        if start - crop < (1 if task.task_type == "language_modeling" else 0):
            raise CoreError(f"{task.path}: item {idx} of task {task.label!r} (after the shuffle): its continuation "
                            f"({len(toks) - start} tokens) does not fit the model's context of {block_size} tokens "
                            "after at least one token of prompt")
        out.append((np.asarray(toks[crop:], dtype=np.int32), start - crop))
    return out


@dataclass
class PreparedTask:
    """This rank's rows of one task: ``rows[r]`` (tokens, start) of item ``item_of[r]`` (local index)."""

    task: CoreTask
    items: list[int]  # the task's item indices this rank scores
    rows: list[tuple[np.ndarray, int]]
    item_of: list[int]


def prepare(tasks: Sequence[CoreTask], block_size: int, rank: int = 0, world_size: int = 1,
            tokenizer=None) -> list[PreparedTask]:
    """Render and tokenize this rank's items (``idx = rank::world_size``) of every task."""
    from data_pipeline.tokenizer import get_tokenizer

    tok = tokenizer or get_tokenizer()
    out = []
    for task in tasks:
        mine = list(range(rank, len(task.items), world_size))
        prompts = [render(task.task_type, task.items[i], task.delimiter,
                          fewshot(task.items, i, task.num_fewshot)) for i in mine]
        flat = tok.encode_batch([p for ps in prompts for p in ps], num_threads=min(8, os.cpu_count() or 1))
        prep, at = PreparedTask(task, mine, [], []), 0
        for local, (i, ps) in enumerate(zip(mine, prompts)):
            token_lists = [[tok.eot_id] + t for t in flat[at:at + len(ps)]]  # BOS + prompt
            at += len(ps)
            rows = item_rows(task, token_lists, i, block_size)
            prep.rows += rows
            prep.item_of += [local] * len(rows)
        out.append(prep)
    return out


def _decide(prep: PreparedTask, rows: list[int], scored: list[int], out: tuple[np.ndarray, ...]) -> dict[int, float]:
    """1.0 / 0.0 per item (local index) of ``rows``: ``evaluate_example``'s decision from the
    sums, counts (and all-greedy flags) ``score_sequences`` gave for the ``scored`` rows."""
    if prep.task.task_type == "language_modeling":  # one row per item; right when every token is the argmax
        return {prep.item_of[r]: float(g) for r, g in zip(scored, out[2])}
    k_of = {r: k for k, r in enumerate(scored)}
    losses: dict[int, list[float]] = {}
    for r in rows:
        k = k_of.get(r)  # no continuation token, or none before it: the mean loss is NaN in core_eval.py too
        losses.setdefault(prep.item_of[r], []).append(-out[0][k] / out[1][k] if k is not None else math.nan)
    return {local: float(m.index(min(m)) == prep.task.items[prep.items[local]]["gold"])  # the first minimum
            for local, m in losses.items()}


def score_task(model, prep: PreparedTask, *, block_size: int, batch_size: int, device: torch.device,
               calls: int, sync: bool, stop: Callable[[], bool] | None) -> np.ndarray:
    """Items right (1.0) of this rank's share of a task, in ``calls`` score_sequences calls (the
    same count on every rank: FSDP forwards are collective)."""
    right = np.zeros(len(prep.items))
    per_call = -(-len(prep.items) // calls) if prep.items else 0
    by_item: dict[int, list[int]] = {}
    for r, local in enumerate(prep.item_of):
        by_item.setdefault(local, []).append(r)
    for c in range(calls):
        rows = [r for local in range(c * per_call, min(len(prep.items), (c + 1) * per_call)) for r in by_item[local]]
        scored = [r for r in rows if 1 <= prep.rows[r][1] < len(prep.rows[r][0])]  # a prompt token, a continuation
        out = score_sequences(model, [prep.rows[r][0][:prep.rows[r][1]].tolist() for r in scored],
                              [prep.rows[r][0][prep.rows[r][1]:].tolist() for r in scored],
                              block_size=block_size, batch_size=batch_size, vocab_size=model_vocab_size(model),
                              device=device, sync_batches=sync,
                              greedy=prep.task.task_type == "language_modeling", stop=stop)
        for local, ok in _decide(prep, rows, scored, out).items():
            right[local] = ok
    return right


def summarize(tasks: Sequence[CoreTask], correct: Sequence[float], limited: bool) -> dict[str, float]:
    """``core/<label>/acc``, ``core/<label>/centered`` and the mean centred accuracy: ``core/CORE``
    over whole tasks, ``core/mean_centered`` with a limit (base_eval.py ``evaluate_model``)."""
    out: dict[str, float] = {}
    centered = []
    for task, right in zip(tasks, correct):
        acc = right / len(task.items)
        b = 0.01 * task.baseline
        centered.append((acc - b) / (1.0 - b))
        out[f"core/{task.label}/acc"] = acc
        out[f"core/{task.label}/centered"] = centered[-1]
    out["core/mean_centered" if limited else "core/CORE"] = sum(centered) / len(centered)
    out["core/num_examples"] = float(sum(len(t.items) for t in tasks))
    return out


class CoreEvaluator:
    """``CoreEvaluator(bundle, limit, batch_size, rank, world_size, device, block_size=None)``, then
    ``evaluator(model, step) -> {"core/CORE", "core/<label>/acc", "core/<label>/centered", ...}``
    on every rank together. The bundle is read and checked here (one :class:`CoreError` line);
    the prompts are tokenized here when ``block_size`` is given, else at the first call."""

    name = "core"
    interruptible = True  # the trainer passes ``stop``: a Ctrl-C ends the scoring between batches

    def __init__(self, bundle: str | os.PathLike | Sequence[CoreTask], limit: int | None = None, batch_size: int = 32,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 block_size: int | None = None, tokenizer=None) -> None:
        if batch_size < 1:
            raise ValueError(f"core batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.tasks = load_bundle(bundle, limit) if isinstance(bundle, (str, os.PathLike)) else list(bundle)
        self.limit, self.limited = limit, any(t.total > len(t.items) for t in self.tasks)  # some item left out
        self.batch_size, self.rank, self.world_size, self.device = batch_size, rank, world_size, torch.device(device)
        self.num_examples = sum(len(t.items) for t in self.tasks)
        self.tokenizer, self._prepared = tokenizer, {}
        if block_size is not None:
            self.prepared(block_size)

    def prepared(self, block_size: int) -> list[PreparedTask]:
        if block_size not in self._prepared:
            self._prepared[block_size] = prepare(self.tasks, block_size, self.rank, self.world_size, self.tokenizer)
        return self._prepared[block_size]

    @torch.inference_mode()
    def evaluate(self, model, stop: Callable[[], bool] | None = None) -> dict[str, float]:
        """The metrics, or ``{}`` when ``stop()`` ended the scoring early on any rank."""
        block_size = model_block_size(model)
        totals = torch.zeros(len(self.tasks) + 1, dtype=torch.float64)  # [items right per task..., ranks stopped]
        sync = dist.is_fsdp(model)  # other models run no collective inside a forward: ranks may differ
        try:
            for j, prep in enumerate(self.prepared(block_size)):
                per_rank = -(-len(prep.task.items) // self.world_size)  # the same on every rank
                right = score_task(model, prep, block_size=block_size, batch_size=self.batch_size, device=self.device,
                                   calls=max(1, -(-per_rank // ITEMS_PER_CALL)), sync=sync, stop=stop)
                totals[j] = float(right.sum())
        except EvalStopped:
            totals[-1] = 1.0
        dist.all_reduce(totals, "core totals")
        if totals[-1].item():
            return {}
        return summarize(self.tasks, totals[:-1].tolist(), self.limited)

    def __call__(self, model, step: int | None = None, stop: Callable[[], bool] | None = None) -> dict[str, float]:
        with eval_mode(model):
            return self.evaluate(model, stop)


def evaluate_core(model, bundle: str | os.PathLike, limit: int | None = None, batch_size: int = 32,
                  device: str | torch.device | None = None) -> dict[str, float]:
    """The Python API of ``gpt2-eval --core``: ``model`` (a ``GPT``, e.g. ``weights.load_model(spec)``)
    on the bundle, split over the ranks of a process group when one is up."""
    device = device if device is not None else next(model.parameters()).device
    rank, world = dist.rank(), dist.world_size()
    return CoreEvaluator(bundle, limit, batch_size, rank, world, device, block_size=model_block_size(model))(model)
