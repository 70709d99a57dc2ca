"""HellaSwag, scored two ways, batched and distributed.

**Harness style** (``acc``, ``acc_norm``, ``acc_bytes``) is lm-evaluation-harness's ``hellaswag``
task, zero-shot, reproduced from the harness's own code:

- ``lm_eval/tasks/hellaswag/hellaswag.yaml``: ``output_type: multiple_choice``,
  ``doc_to_text: "{{query}}"``, ``doc_to_choice: "choices"``, metrics ``acc`` and ``acc_norm``;
  the default ``target_delimiter`` is ``" "``, so each request is ``(query, " " + choice)``.
- ``lm_eval/tasks/hellaswag/utils.py``: ``preprocess`` (strip; ``" [title]"`` -> ``". "``;
  drop ``[...]`` markers with ``re.sub("\\[.*?\\]", "", text)``; ``"  "`` -> ``" "``) and
  ``process_docs``: ``query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``,
  ``choices = [preprocess(e) for e in endings]``.
- ``lm_eval/api/task.py`` ``process_results`` for ``multiple_choice``: ``acc`` = argmax of the
  summed log-likelihoods; ``acc_norm`` = argmax of ``ll / len(choice)`` (characters of the
  choice *without* the delimiter); ``acc_bytes`` = argmax of ``ll / len(choice.encode())``;
  ``np.argmax`` (ties go to the first choice); ``mean`` aggregation with the sample standard
  error of the mean (``lm_eval/api/metrics.py`` ``mean_stderr``).
- ``_encode_pair`` (``lm_eval/api/model.py`` ``TemplateLM`` in lm-eval 0.4.x, formerly
  ``lm_eval/models/huggingface.py``) and ``HFLM._loglikelihood_tokens``: trailing spaces of the
  context move to the front of the continuation; the continuation's tokens are
  ``encode(context + continuation)[len(encode(context)):]``; the model sees
  ``(context_enc + continuation_enc)[-(max_length + 1):][:-1]`` (left-truncated to the context
  length) and the last ``len(continuation_enc)`` positions are scored with ``log_softmax``.

``benchmarks/compare_lm_eval.sh`` runs lm-eval 0.4.13 itself (``evals/lm_eval_task/``, the
harness's task on a local file) and checks that acc, acc_norm and every per-choice
log-likelihood agree with ours.

**Completion style** (``completion_acc``, ``completion_acc_norm``) is what build-nanogpt's
``hellaswag.py`` and llm.c's ``dev/data/hellaswag.py`` compute: context ``encode(ex["ctx"])``
(no preprocessing), each ending encoded on its own as ``encode(" " + ending)``; ``acc`` from
the summed log-likelihood, ``acc_norm`` from the *mean per-token* log-likelihood. (The same
left truncation is applied; HellaSwag never needs it at 1024 tokens.)

Published GPT-2 124M figures on the 10,042 validation examples, for comparison::

    style                          acc      acc_norm
    harness (lm-eval hellaswag)    0.2892   0.3114     (build-nanogpt hellaswag.py docstring)
    completion (build-nanogpt)     0.2859   0.2955

Speed: two scoring paths, picked automatically (:func:`score_sequences`), equal up to float
summation order. For an eager native ``GPT`` (not compiled, not FSDP), **shared prefix**: the 4
candidates of a style share their context tokens (the harness encodes the context on its own,
build-nanogpt too), so each context runs once, its keys/values are cached and copied out to its
candidates, and only the continuations run after it; the LM head (most of a small model's cost)
runs once per distinct scored prefix, vocabulary slice by slice. For compiled or FSDP models
(fixed shapes; the same forwards on every rank) and Hugging Face models, **packed**: the 8
candidate sequences of every example are sorted by length and scored ``batch_size`` rows per
forward pass, right-padded to a multiple of ``pad_multiple`` (a compiled model sees a handful of
shapes, not one per batch), ``log_softmax`` only on the scored positions, and every rank runs
the same number of forward passes (FSDP-safe). Rank r takes examples ``r::world_size``; counts
are all-reduced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from evals.common import autocast_for, eval_mode, stop_check
from pretrain import dist

# The canonical files of the HellaSwag repository (github.com/rowanz/hellaswag, data/).
HELLASWAG_URLS = {
    "validation": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
    "train": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_train.jsonl",
}
EXPECTED_EXAMPLES = {"validation": 10042, "train": 39905}
SPLIT_ALIASES = {"validation": "validation", "val": "validation", "train": "train"}
REQUIRED_FIELDS = {"activity_label": str, "ctx_a": str, "ctx_b": str, "ctx": str, "endings": list}
NUM_CHOICES = 4

HARNESS, COMPLETION = 0, 1  # scoring styles
METRICS = ("acc", "acc_norm", "acc_bytes", "completion_acc", "completion_acc_norm")


class HellaSwagError(ValueError):
    """HellaSwag data that cannot be used; the message names the file (and line) and the fix."""


# --------------------------------------------------------------------------- data


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpt2-pretrain" / "hellaswag"


def canonical_split(split: str) -> str:
    if split not in SPLIT_ALIASES:
        raise HellaSwagError(
            f"HellaSwag split {split!r} is not supported; use 'validation' (default) or 'train' "
            "(the test split has no labels)"
        )
    return SPLIT_ALIASES[split]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def resolve_path(path: str | os.PathLike | None = None, split: str = "validation",
                 cache_dir: str | os.PathLike | None = None) -> Path:
    """The local HellaSwag jsonl to read: ``path`` when given, else the cached copy of the
    canonical file, downloaded once (verified by its example count; its size and sha256 are
    recorded next to it and checked on every later use)."""
    if path is not None:
        return Path(path)
    split = canonical_split(split)
    url = HELLASWAG_URLS[split]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / url.rsplit("/", 1)[1]
    meta_path = target.with_name(target.name + ".meta.json")
    hint = "pass --hellaswag PATH (eval.hellaswag_path in a training config) to a local copy of " + url
    if target.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        size = target.stat().st_size
        if size != meta["size"] or _file_sha256(target) != meta["sha256"]:
            raise HellaSwagError(
                f"{target}: cached HellaSwag file does not match its recorded size/sha256 ({meta_path}); "
                "delete both files to download it again, or " + hint
            )
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as f:
                shutil.copyfileobj(resp, f)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise HellaSwagError(f"could not download HellaSwag ({split}) from {url} ({reason}); {hint}") from None
        n = _count_lines(tmp)
        if n != EXPECTED_EXAMPLES[split]:
            raise HellaSwagError(
                f"{url}: downloaded {n} examples, expected {EXPECTED_EXAMPLES[split]} for the {split} split; {hint}"
            )
        meta = {"url": url, "split": split, "examples": n, "size": tmp.stat().st_size, "sha256": _file_sha256(tmp)}
        os.replace(tmp, target)
        meta_tmp = meta_path.with_name(f".{meta_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        meta_tmp.write_text(json.dumps(meta, indent=1))
        os.replace(meta_tmp, meta_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _validate(ex: Any, where: str) -> dict:
    if not isinstance(ex, dict):
        raise HellaSwagError(f"{where}: expected a JSON object, got {type(ex).__name__}")
    for name, typ in REQUIRED_FIELDS.items():
        if name not in ex:
            raise HellaSwagError(f"{where}: missing field {name!r}; a HellaSwag line needs {sorted(REQUIRED_FIELDS) + ['label']}")
        if not isinstance(ex[name], typ):
            raise HellaSwagError(f"{where}: field {name!r} must be a {typ.__name__}, got {type(ex[name]).__name__}")
    endings = ex["endings"]
    if len(endings) != NUM_CHOICES or not all(isinstance(e, str) for e in endings):
        raise HellaSwagError(f"{where}: 'endings' must be a list of {NUM_CHOICES} strings, got {endings!r:.200}")
    if "label" not in ex:
        raise HellaSwagError(f"{where}: missing field 'label' (the HellaSwag test split has none; use validation or train)")
    label = ex["label"]
    # The rowanz jsonl stores an int; the Hugging Face copy stores a digit string.
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_CHOICES:
        raise HellaSwagError(f"{where}: 'label' must be an integer in [0, {NUM_CHOICES}), got {ex['label']!r}")
    return {**ex, "label": label}


def load_examples(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The examples of a HellaSwag jsonl file (the first ``limit`` when given), validated: a
    bad line raises one :class:`HellaSwagError` naming ``file:line``."""
    p = Path(path)
    if p.exists() and not p.is_file():
        raise HellaSwagError(f"{p}: is a {'directory' if p.is_dir() else 'FIFO, socket or device'}, not a HellaSwag "
                             f"jsonl file; pass --hellaswag PATH (eval.hellaswag_path) to a copy of "
                             f"{HELLASWAG_URLS['validation']}")
    if not p.is_file():
        raise HellaSwagError(
            f"{p}: HellaSwag file not found; pass --hellaswag PATH (eval.hellaswag_path) to a copy of "
            f"{HELLASWAG_URLS['validation']}, or leave it unset to download it"
        )
    if limit is not None and limit < 1:
        raise HellaSwagError(f"limit must be >= 1 (the number of examples to score), got {limit}; "
                             "leave it unset to score them all")
    examples = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise HellaSwagError(
                    f"{p}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); HellaSwag "
                    "files are UTF-8 jsonl: re-download or re-encode the file") from None
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise HellaSwagError(f"{p}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
            examples.append(_validate(ex, f"{p}:{lineno}"))
    if not examples:
        raise HellaSwagError(f"{p}: no examples in the file; pass a HellaSwag jsonl")
    return examples


# --------------------------------------------------------------------------- prompts


def preprocess(text: str) -> str:
    """lm-evaluation-harness ``lm_eval/tasks/hellaswag/utils.py::preprocess``: the brackets are
    artifacts of HellaSwag's WikiHow part."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def harness_doc(ex: dict) -> tuple[str, list[str]]:
    """``(query, choices)`` as the harness's ``process_docs`` builds them."""
    ctx = ex["ctx_a"] + " " + ex["ctx_b"].capitalize()
    return preprocess(ex["activity_label"] + ": " + ctx), [preprocess(e) for e in ex["endings"]]


def encode_pair(encode, context: str, continuation: str, eot_id: int) -> tuple[list[int], list[int]]:
    """The harness's ``TemplateLM._encode_pair`` and its empty-context case in ``loglikelihood``
    (lm-eval 0.4.x ``lm_eval/api/model.py``): an empty context becomes the end-of-text token,
    unless the continuation already starts with it (then that token is the context). One home for
    these token boundaries: HellaSwag and every harness task (``evals/harness.py``) use it."""
    if context == "":
        cont = encode(continuation)
        return ([eot_id], cont) if cont[:1] != [eot_id] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


@dataclass
class Prepared:
    """The tokenized candidates of some examples: candidate ``k`` of example ``i`` in style ``s``
    is row ``(i * 2 + s) * 4 + k`` of ``context``/``continuation``."""

    labels: list[int]
    choice_chars: list[list[int]]  # harness choice lengths in characters (acc_norm)
    choice_bytes: list[list[int]]  # ... and in UTF-8 bytes (acc_bytes)
    context: list[list[int]] = field(default_factory=list)
    continuation: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


def prepare(examples: Sequence[dict], tokenizer=None) -> Prepared:
    """Tokenize the 2 × 4 candidates of every example (both styles)."""
    if tokenizer is None:
        from data_pipeline.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    encode, eot = tokenizer.encode, tokenizer.eot_id
    out = Prepared(labels=[], choice_chars=[], choice_bytes=[])
    for ex in examples:
        query, choices = harness_doc(ex)
        out.labels.append(ex["label"])
        out.choice_chars.append([len(c) for c in choices])
        out.choice_bytes.append([len(c.encode("utf-8")) for c in choices])
        for choice in choices:  # harness: (query, " " + choice), target_delimiter " "
            ctx, cont = encode_pair(encode, query, " " + choice, eot)
            out.context.append(ctx)
            out.continuation.append(cont)
        ctx = encode(ex["ctx"])  # completion: ctx, then " " + ending encoded on its own
        for ending in ex["endings"]:
            out.context.append(ctx)
            out.continuation.append(encode(" " + ending))
    return out


# --------------------------------------------------------------------------- scoring


def _logits_of(out) -> torch.Tensor:
    """Logits from a native ``(logits, loss)`` tuple or a Hugging Face output."""
    if isinstance(out, tuple):
        return out[0]
    return out.logits if hasattr(out, "logits") else out


def model_block_size(model) -> int:
    config = getattr(model, "config", None)
    for name in ("block_size", "n_positions"):
        if config is not None and isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError("cannot tell the model's context length: it has no config.block_size; pass block_size=")


def model_vocab_size(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "vocab_size", None) if config is not None else None


def _head_trick_ok(model) -> bool:
    """An eager (not compiled) native GPT: its forward can apply the head at the scored positions
    only (``GPT.forward(at=(rows, pos))``). A compiled model would recompile for every new count
    of scored positions, so it takes the full logits."""
    from pretrain.model.gpt import GPT

    return isinstance(model, GPT) and getattr(model, "_compiled_call_impl", None) is None


def _prefix_sharing_ok(model) -> bool:
    """An eager native ``GPT`` with plain blocks: nothing compiled (a compiled model would
    recompile for the varying shapes below), not FSDP-sharded or wrapped (FSDP needs every rank
    to run the same forwards; its blocks are no longer plain ``Block``s), no activation
    checkpointing wrappers."""
    from pretrain.model.gpt import GPT, Block

    if not isinstance(model, GPT) or any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()):
        return False
    if any(type(block) is not Block for block in model.transformer.h):
        return False
    return not dist.is_fsdp(model)


class _ScoredTokens:
    """Hidden states waiting for the LM head, and which (sequence, target token) each scores;
    :meth:`flush` adds the log-probabilities into ``sums``."""

    def __init__(self, model, sums: torch.Tensor, misses: torch.Tensor | None = None) -> None:
        self.model, self.sums, self.misses = model, sums, misses
        self.hidden: list[torch.Tensor] = []
        self.num_hidden = 0
        self.rows: list[int] = []
        self.targets: list[int] = []
        self.seqs: list[int] = []

    def add_hidden(self, h: torch.Tensor) -> int:
        """Queue (U, C) hidden states; returns the buffer index of the first."""
        self.hidden.append(h)
        self.num_hidden += h.size(0)
        return self.num_hidden - h.size(0)

    def add_token(self, row: int, target: int, seq: int) -> None:
        self.rows.append(row)
        self.targets.append(target)
        self.seqs.append(seq)

    def flush(self) -> None:
        if not self.rows:
            return
        dev = self.sums.device
        seqs = torch.tensor(self.seqs, device=dev)
        with autocast_for(dev):  # the head in bf16 on CUDA, as in the model's own forward
            out = self.model.token_logprobs(torch.cat(self.hidden), torch.tensor(self.rows, device=dev),
                                            torch.tensor(self.targets, device=dev),
                                            greedy=self.misses is not None)  # (S,) [, (S,) bool]
        if self.misses is not None:
            out, is_top = out
            self.misses.index_add_(0, seqs, (~is_top).float())
        self.sums.index_add_(0, seqs, out)
        self.hidden, self.num_hidden, self.rows, self.targets, self.seqs = [], 0, [], [], []


def _split_sorted(lengths: list[int], cost: int, max_rows: int | None = None) -> list[tuple[int, int]]:
    """Cut rows of non-increasing ``lengths`` into consecutive forwards ``[lo, hi)`` of at most
    ``max_rows`` rows, minimising the padded positions (rows × longest) plus ``cost`` positions
    per forward."""
    n = len(lengths)
    max_rows = max_rows or n
    best = [0] + [None] * n  # best[j]: cheapest cover of rows [0, j)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows), j):  # last forward = rows [i, j), padded to lengths[i]
            c = best[i] + (j - i) * lengths[i] + cost
            if best[j] is None or c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], n
    while j > 0:
        out.append((cut[j], j))
        j = cut[j]
    return out[::-1]


def _score_continuations(model, inputs: list[list[int]], cont_lens: list[int], P: int, chunk: list[list[int]],
                         cache, scored: _ScoredTokens, *, split_cost: int, batch_size: int,
                         device: torch.device) -> None:
    """The continuations of ``chunk`` (groups of rows sharing a prefix of length ``P``, whose
    keys and values are in ``cache``, one row per group) through the trunk; every hidden state of
    a new (prefix, continuation-so-far) is queued in ``scored`` once, with the targets it scores."""
    from pretrain.inference.cache import KVCache

    # Continuations, longest first, cut into forwards of similar length (less padding).
    feed = sorted(((cont_lens[i] - 1, g, i) for g, grp in enumerate(chunk) for i in grp if cont_lens[i] > 1),
                  reverse=True)
    trie: dict[tuple[int, int], int] = {}  # (node, token) -> buffer index of its hidden state
    for seg in _split_sorted([length for length, _, _ in feed], split_cost, max_rows=batch_size):
        part = feed[seg[0]:seg[1]]
        Tc_part = part[0][0]
        idx = torch.zeros(len(part), Tc_part, dtype=torch.long)  # (R, Tc), right-padded
        sel_row, sel_pos, pending = [], [], []
        base = scored.num_hidden  # the buffer index this forward's first hidden state gets
        for r, (_, g, i) in enumerate(part):
            cont = inputs[i][P:]
            idx[r, : len(cont) - 1] = torch.tensor(cont[:-1])
            node = -1 - g  # the group's prefix
            for t in range(len(cont) - 1):  # hidden at local t predicts cont[t + 1]
                u = trie.setdefault((node, cont[t]), base + len(sel_row))
                if u == base + len(sel_row):  # a new (prefix, continuation-so-far)
                    sel_row.append(r)
                    sel_pos.append(t)
                pending.append((u, cont[t + 1], i))
                node = u
        rg = torch.tensor([g for _, g, _ in part], dtype=torch.long, device=device)
        cont_cache = KVCache(k=[k.index_select(0, rg) for k in cache.k],  # (R, nh, P+Tc, hs)
                             v=[v.index_select(0, rg) for v in cache.v], pos=P)
        if sel_row:
            with autocast_for(device):
                h = model.hidden_states(idx.to(device, non_blocking=True), kv_cache=cont_cache)  # (R, Tc, C)
            scored.add_hidden(h[torch.tensor(sel_row, device=device),
                                torch.tensor(sel_pos, device=device)])  # (U, C): indices base, base + 1, ...
        for u, tgt, i in pending:
            scored.add_token(u, tgt, i)


class EvalStopped(Exception):
    """A requested stop (``stop()`` of the trainer) ended the scoring early on this rank."""


def _score_shared_prefix(model, inputs: list[list[int]], cont_lens: list[int], *, batch_size: int,
                         device: torch.device, head_rows: int = 1024, split_cost: int | None = None,
                         misses: torch.Tensor | None = None,
                         stopped: Callable[[], bool] = lambda: False) -> torch.Tensor:
    """Sums of continuation log-probabilities, running each distinct prefix once.

    ``inputs[i]`` is the (already left-truncated) sequence whose last ``cont_lens[i]`` tokens
    are scored; its prefix is everything before them. Rows with the same prefix (the 4
    candidates of a HellaSwag style share the context tokens) form a group. Groups with the same
    prefix length are batched (up to ``batch_size`` candidates): one forward over the prefixes
    fills a ``KVCache``, whose rows are copied out to each candidate, and forwards over the
    continuations (right-padded; padding comes after the real positions, so causal attention
    keeps them exact) attend to it. The hidden state at the prefix's last position predicts the first token of all its
    candidates; it and any position whose (prefix, continuation-so-far) was already seen go
    through the LM head once. The head runs in batches of ``head_rows`` hidden states
    (``GPT.token_logprobs``). The continuations of a batch are cut into forwards
    of similar length where the padding saved outweighs ``split_cost`` positions per extra
    forward (default 16 on CPU, where a small forward's overhead is about that; 256 elsewhere).
    ``misses`` (n,), when given, counts each row's scored tokens that are not the argmax."""
    from pretrain.inference.cache import KVCache

    n = len(inputs)
    sums = torch.zeros(n, dtype=torch.float32, device=device)
    scored = _ScoredTokens(model, sums, misses)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, toks in enumerate(inputs):
        groups.setdefault(tuple(toks[: len(toks) - cont_lens[i]]), []).append(i)
    by_len: dict[int, list[list[int]]] = {}
    for prefix, rows in groups.items():
        by_len.setdefault(len(prefix), []).append(rows)
    cache_dtype = torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype  # as autocast_for
    if split_cost is None:
        split_cost = 16 if device.type == "cpu" else 256

    for P in sorted(by_len, reverse=True):
        bucket = sorted(by_len[P], key=lambda rows: -max(cont_lens[i] for i in rows))  # similar lengths together
        chunks, cur = [], []
        for rows in bucket:  # at most batch_size candidate rows per forward (at least one group)
            if cur and sum(map(len, cur)) + len(rows) > batch_size:
                chunks.append(cur)
                cur = []
            cur.append(rows)
        chunks.append(cur)
        for chunk in chunks:
            if stopped():
                raise EvalStopped
            G = len(chunk)
            rows = [i for grp in chunk for i in grp]
            Tc = max(cont_lens[i] for i in rows) - 1  # continuation tokens fed to the model
            prefixes = torch.tensor([inputs[grp[0]][:P] for grp in chunk], dtype=torch.long)  # (G, P)
            cache = KVCache.empty(model.config, G, P + Tc, device, cache_dtype)
            with autocast_for(device):
                h = model.hidden_states(prefixes.to(device, non_blocking=True), kv_cache=cache)  # (G, P, C)
            base = scored.add_hidden(h[:, -1])  # (G, C): the prefixes' last positions
            for g, grp in enumerate(chunk):
                for i in grp:
                    scored.add_token(base + g, inputs[i][P], i)
            _score_continuations(model, inputs, cont_lens, P, chunk, cache, scored, split_cost=split_cost,
                                 batch_size=batch_size, device=device)
            if scored.num_hidden >= head_rows:
                scored.flush()
    scored.flush()
    return sums


def _score_packed(model, inputs: list[list[int]], cont_lens: list[int], *, block_size: int, batch_size: int,
                  pad_multiple: int, vocab_size: int | None, device: torch.device, sync_batches: bool,
                  head_trick: bool, misses: torch.Tensor | None = None,
                  stopped: Callable[[], bool] = lambda: False) -> torch.Tensor:
    """The packed path of :func:`score_sequences`: every row, sorted by length, ``batch_size`` per
    forward, right-padded to a multiple of ``pad_multiple``; ``misses`` as in :func:`_score_shared_prefix`."""
    n = len(inputs)
    order = sorted(range(n), key=lambda i: -len(inputs[i]))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    num_batches = len(batches)
    if sync_batches:
        num_batches = int(dist.all_reduce(torch.tensor([num_batches]), "scoring batch count", op="max").item())

    sums = torch.zeros(n, dtype=torch.float32, device=device)
    for b in range(num_batches):
        if stopped():  # agreed between ranks for an FSDP model (evals.common.stop_check)
            raise EvalStopped
        rows = batches[b] if b < len(batches) else []
        max_in = max((len(inputs[i]) - 1 for i in rows), default=1)
        T = min(block_size, -(-max_in // pad_multiple) * pad_multiple)  # bucketed length
        idx = torch.zeros(batch_size, T, dtype=torch.long)
        sel_row, sel_pos, sel_tgt, sel_seq = [], [], [], []
        for r, i in enumerate(rows):
            toks = inputs[i]
            L = len(toks) - 1  # model input is toks[:-1]; targets are toks[1:]
            idx[r, :L] = torch.tensor(toks[:-1])
            c = cont_lens[i]
            sel_row.extend([r] * c)
            sel_pos.extend(range(L - c, L))
            sel_tgt.extend(toks[L - c + 1: L + 1])
            sel_seq.extend([i] * c)
        rows_t = torch.tensor(sel_row, dtype=torch.long, device=device)
        pos_t = torch.tensor(sel_pos, dtype=torch.long, device=device)
        with autocast_for(device):
            if head_trick:  # the LM head at the scored positions only: (S, V_rows)
                picked = model(idx.to(device, non_blocking=True), at=(rows_t, pos_t))[0]
            else:
                picked = _logits_of(model(idx.to(device, non_blocking=True)))[rows_t, pos_t]  # (S, V_rows)
        if not rows:
            continue  # a padding forward: this rank is done, others are not
        if vocab_size is not None:
            picked = picked[:, :vocab_size]  # padded vocab rows carry -inf anyway
        logp = F.log_softmax(picked.float(), dim=-1)  # (S, V)
        tgt = torch.tensor(sel_tgt, device=device)
        tok_lp = logp.gather(1, tgt[:, None]).squeeze(1)  # (S,)
        seq = torch.tensor(sel_seq, device=device)
        sums.index_add_(0, seq, tok_lp)
        if misses is not None:  # argmax: the first maximum, as the harness's logits.argmax()
            misses.index_add_(0, seq, (picked.argmax(dim=-1) != tgt).float())
    return sums


@torch.inference_mode()
def score_sequences(model, context: Sequence[list[int]], continuation: Sequence[list[int]], *,
                    block_size: int, batch_size: int = 32, pad_multiple: int = 32,
                    vocab_size: int | None = None, device: str | torch.device = "cpu",
                    sync_batches: bool = True, head_positions_only: bool | None = None,
                    share_prefix: bool | None = None, greedy: bool = False,
                    stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, ...]:
    """Sum of log p(continuation token | prefix) over each continuation, and its token count;
    with ``greedy`` also whether every continuation token is the model's argmax (bool array:
    lm-evaluation-harness's ``is_greedy``). ``stop`` (the trainer's) ends the scoring early with
    :class:`EvalStopped`.

    Sequences are left-truncated to ``block_size + 1`` tokens as the harness does. Two paths
    give the same numbers (up to float summation order):

    - **shared prefix** (``share_prefix``; the default for an eager native ``GPT`` with plain
      blocks, unless ``head_positions_only`` is given): each distinct context runs once and its
      candidates attend to its cached keys/values; the LM head runs once per distinct scored
      prefix, in vocabulary slices. See :func:`_score_shared_prefix`. ``batch_size`` bounds
      the candidate rows per forward. Shapes vary per batch and ranks run different numbers
      of forwards, so it is not for compiled or FSDP models (the automatic choice avoids them).
    - **packed** (everything else: compiled models, FSDP, Hugging Face models): all rows sorted
      by length and run ``batch_size`` per forward, right-padded to a multiple of
      ``pad_multiple`` (padded rows and positions are never scored), so a compiled model sees
      a handful of shapes. With ``sync_batches`` and a process group up, every rank runs as
      many forwards as the busiest rank. ``head_positions_only`` (default: on for an eager
      native ``GPT``) applies the LM head at the scored positions only
      (``GPT.forward(at=(rows, pos))``); the others' logits are taken there from the full ones."""
    device = torch.device(device)
    if share_prefix is None:
        share_prefix = head_positions_only is None and _prefix_sharing_ok(model)
    elif share_prefix and not _prefix_sharing_ok(model):
        raise ValueError("share_prefix=True needs an eager native GPT with plain blocks (not compiled, FSDP or "
                         "wrapped); leave share_prefix=None to pick the packed path automatically")
    head_trick = _head_trick_ok(model) if head_positions_only is None else head_positions_only
    inputs, cont_lens = [], []
    for ctx, cont in zip(context, continuation):
        if not cont:
            raise ValueError("a continuation has no tokens; nothing to score")
        if not ctx:
            raise ValueError("a context has no tokens; give it at least one (the harness uses the end-of-text "
                             "token for an empty context, see encode_pair)")
        if len(cont) > block_size:
            raise ValueError(f"a continuation of {len(cont)} tokens is longer than the model's context ({block_size})")
        toks = (ctx + cont)[-(block_size + 1):]
        inputs.append(toks)
        cont_lens.append(len(cont))
    misses = torch.zeros(len(inputs), dtype=torch.float32, device=device) if greedy else None
    stopped = stop_check(model, stop)
    if share_prefix:
        sums = _score_shared_prefix(model, inputs, cont_lens, batch_size=batch_size, device=device, misses=misses,
                                    stopped=stopped)
    else:
        sums = _score_packed(model, inputs, cont_lens, block_size=block_size, batch_size=batch_size,
                             pad_multiple=pad_multiple, vocab_size=vocab_size, device=device,
                             sync_batches=sync_batches, head_trick=head_trick, misses=misses, stopped=stopped)
    out = sums.double().cpu().numpy(), np.asarray(cont_lens, dtype=np.int64)
    return out + (misses.cpu().numpy() == 0,) if greedy else out


def example_predictions(prep: Prepared, sums: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Per example, 1.0 where a metric's prediction is the label (harness ``process_results``)."""
    n = len(prep)
    ll = sums.reshape(n, 2, NUM_CHOICES)  # (N, style, choice)
    ntok = counts.reshape(n, 2, NUM_CHOICES).astype(np.float64)
    gold = np.asarray(prep.labels)
    chars = np.asarray(prep.choice_chars, dtype=np.float64).reshape(n, NUM_CHOICES)
    nbytes = np.asarray(prep.choice_bytes, dtype=np.float64).reshape(n, NUM_CHOICES)
    h, c = ll[:, HARNESS], ll[:, COMPLETION]
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice: as numpy in the harness
        preds = {
            "acc": np.argmax(h, axis=1),
            "acc_norm": np.argmax(h / chars, axis=1),
            "acc_bytes": np.argmax(h / nbytes, axis=1),
            "completion_acc": np.argmax(c, axis=1),
            "completion_acc_norm": np.argmax(c / ntok[:, COMPLETION], axis=1),
        }
    return {k: (v == gold).astype(np.float64) for k, v in preds.items()}


def summarize(correct: dict[str, float], n: int, prefix: str = "hellaswag/") -> dict[str, float]:
    """Means and sample standard errors of the mean (harness ``mean_stderr``) from counts."""
    out: dict[str, float] = {}
    for k in METRICS:
        p = correct[k] / n if n else float("nan")
        out[f"{prefix}{k}"] = p
        out[f"{prefix}{k}_stderr"] = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
    out[f"{prefix}num_examples"] = float(n)
    return out


def evaluate(model, prep: Prepared, *, batch_size: int = 32, device: str | torch.device = "cpu",
             block_size: int | None = None, pad_multiple: int = 32, prefix: str = "hellaswag/",
             head_positions_only: bool | None = None, share_prefix: bool | None = None,
             stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Score this rank's prepared examples, all-reduce the counts, return the metrics (the
    same dict on every rank; ``{}`` when ``stop()`` ended the scoring early on any rank). The
    scoring path is picked as in :func:`score_sequences`."""
    block_size = block_size or model_block_size(model)
    try:
        sums, counts = score_sequences(
            model, prep.context, prep.continuation, block_size=block_size, batch_size=batch_size,
            pad_multiple=pad_multiple, vocab_size=model_vocab_size(model), device=device,
            head_positions_only=head_positions_only, share_prefix=share_prefix, stop=stop,
        )
        right = example_predictions(prep, sums, counts) if len(prep) else {k: np.zeros(0) for k in METRICS}
        stopped = 0.0
    except EvalStopped:
        right, stopped = {k: np.zeros(0) for k in METRICS}, 1.0
    totals = torch.tensor([len(prep)] + [float(right[k].sum()) for k in METRICS] + [stopped], dtype=torch.float64)
    dist.all_reduce(totals, "hellaswag totals")
    if totals[-1].item():
        return {}
    n = int(totals[0].item())
    return summarize({k: float(totals[1 + j].item()) for j, k in enumerate(METRICS)}, n, prefix)


class HellaSwagEvaluator:
    """In-loop HellaSwag: ``HellaSwagEvaluator(path, limit, batch_size, rank, world_size, device)``,
    then ``evaluator(model, step) -> {"hellaswag/acc": ..., "hellaswag/acc_norm": ..., ...}`` on
    every rank together. Data is read and tokenized once, here (a bad file fails at start-up);
    ``path=None`` downloads the canonical validation file once into the cache."""

    name = "hellaswag"

    def __init__(self, path: str | os.PathLike | None = None, limit: int | None = None, batch_size: int = 32,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 split: str = "validation", pad_multiple: int = 32, tokenizer=None) -> None:
        if batch_size < 1:
            raise ValueError(f"hellaswag batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.path = resolve_path(path, split)
        examples = load_examples(self.path, limit)
        self.num_examples = len(examples)
        self.prep = prepare(examples[rank::world_size], tokenizer)
        self.batch_size, self.device, self.pad_multiple = batch_size, torch.device(device), pad_multiple

    interruptible = True  # the trainer passes ``stop``: a Ctrl-C ends the scoring between batches

    def __call__(self, model, step: int | None = None, stop: Callable[[], bool] | None = None) -> dict[str, float]:
        with eval_mode(model):
            return evaluate(model, self.prep, batch_size=self.batch_size, device=self.device,
                            pad_multiple=self.pad_multiple, stop=stop)
