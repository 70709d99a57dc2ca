"""``gpt2-prepare`` split into N independent tasks, and the merge of their parts.

    gpt2-prepare SOURCE OUT --tasks N --task-id I    # one task: a SLURM array task, one process of many
    gpt2-prepare SOURCE OUT --tasks N --local        # all N tasks as processes here, then the merge
    gpt2-prepare --merge OUT                         # the one manifest.json, once every task is complete

The split. The source's files (sorted) are cut into *units*: the files themselves when there are
at least N, else every parquet row group on its own (other files stay whole). Task I owns units
I, I+N, I+2N, ... In source order::

    units      | u0 | u1 | u2 | u3 | u4 | u5 | u6 | ...        (N = 3)
    owner        t0   t1   t2   t0   t1   t2   t0
    validation |<- first --val-tokens tokens ->|  (inside the first file: u0 alone, or its row groups u0, u1, ...)

Validation is the same in every mode: the first ``--val-tokens`` tokens of the source's stream,
cut at exactly that token as a plain prepare cuts it (mid-document; the rest of the cut document
opens the training split). So a plain prepare, ``--tasks 1`` and ``--tasks 8`` make the same val
shards, byte for byte (the same val loss). Under ``--tasks`` the cut must fall inside the source's
first file (in sorted order), so that a task owning no unit of that file knows, without reading
it, that none of its rows is validation; a first file holding fewer tokens is refused in one line
(lower ``--val-tokens``, or prepare in one piece). The tasks that own a unit of that file (task 0
alone when units are files) find the document the cut falls in by tokenizing up to it first
(recorded in the task's manifest so a rerun does not repeat it); task 0 reads those documents as
the head of its stream and writes their first ``--val-tokens`` tokens as the val shards and the
cut document's rest as the first tokens of its training shards; the other tasks leave those
documents out of their units. No other task reads the first file.

The training tokens are then plain prepare's, as a multiset, in a different order: task 0's
training stream opens with the cut document's rest (as plain prepare's does), and after it every
training document is whole and in one task's stream, in source order within the task; the
merged training split is task 0's stream, then task 1's, ... (``--tasks 1``: plain prepare's
training tokens in plain prepare's order).

A task is an ordinary prepare over its own row stream (:class:`TaskSource`: task 0's starts with
the documents holding the validation tokens), through the same writer, so it is resumable and verified on its own:
kill it and rerun it, and its shards end byte-identical. It writes ``{split}_tIIIII_NNNNNN.bin``
and ``manifest.task-IIIII-of-NNNNN.json`` (``data_pipeline.shards.part_name``) into OUT, next to the
other tasks' files; no two tasks write the same file.

The merge checks that every task is present and complete, that all of them were run with the
same arguments on the same source (the same units and validation cut) and that every shard they
list is there with its size, then writes ``manifest.json``: the val shards, then each task's train
shards in task order, each entry with its sha256, token count, max token id and ``task``. It
writes nothing when a check fails, and names the missing or incomplete tasks. The trainer then
reads OUT as it reads a plain prepare's directory.
"""

from __future__ import annotations

import itertools
import re
import reprlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_pipeline.job import (
    MANIFEST_VERSION,
    SETTING_FLAGS,
    DocReader,
    Job,
    PrepareError,
    check_out_dir,
    command_line,
    ordered_map,
)
from data_pipeline.manifest import read_manifest
from data_pipeline.shards import (
    MANIFEST_NAME,
    is_url,
    local_path,
    part_manifests,
    part_name,
    shard_bytes,
    write_manifest,
)
from data_pipeline.sources import FileSource, Source

Segment = tuple[int, int, int | None]  # (unit index, first row, end row or None = to the unit's end)


class TaskSource(Source):
    """The rows of some units of a :class:`FileSource`, segment after segment (see the module doc)."""

    def __init__(self, files: FileSource, units: list[tuple[int, int | None]], segments: list[Segment]):
        self.files, self.units, self.segments = files, units, segments
        self.spec = files.spec
        self._entered: list[tuple[int, int]] = []  # (stream row where segment k begins, k), from row 0

    def _count(self, seg: Segment, exact: bool = False) -> int | None:
        u, first, end = seg
        n = self.files.unit_count(self.units[u], exact)
        if n is None:
            return None
        return max(0, (n if end is None else min(end, n)) - first)

    def iter_rows(self, start: int = 0) -> Iterator[dict]:
        skip, row = start, 0
        self._entered = []
        for k, seg in enumerate(self.segments):
            u, first, end = seg
            if skip:
                n = self._count(seg)
                if n is not None and skip >= n:  # the whole segment is behind us (metadata says)
                    skip, row = skip - n, row + n
                    continue
            self._entered.append((row + skip, k))
            rows = self.files.unit_rows(self.units[u], first + skip)
            if end is not None:
                rows = itertools.islice(rows, max(end - first - skip, 0))
            got = 0
            for r in rows:
                got += 1
                yield r
            if skip and not got:  # the skip ran past this segment (counted by reading)
                n = self._count(seg, exact=True)
                skip, row = skip - n, row + n
            else:
                row, skip = row + skip + got, 0

    def locate(self, row: int) -> tuple[int, int]:
        """(unit index, row within the unit) of stream row ``row``, for an iteration from row 0 that
        has reached it."""
        for begin, k in reversed(self._entered):
            if begin <= row:
                u, first, _ = self.segments[k]
                return u, first + row - begin
        raise ValueError(f"row {row} is before the first segment read")

    def num_rows(self) -> int | None:
        counts = [self._count(s) for s in self.segments]
        return None if any(c is None for c in counts) else sum(counts)

    def describe(self) -> dict:
        whole = all(g is None for _, g in self.units)
        return {**self.files.describe(), "units": len(self.units), "unit": "file" if whole else "parquet row group"}


def _split_units(cfg, source: Source) -> list[tuple[int, int | None]]:
    if not isinstance(source, FileSource):
        raise PrepareError(
            f"{cfg.source}: --tasks splits a source of files (local paths, globs or fsspec URLs of parquet / "
            f"jsonl / txt) by file or row group; a {source.describe().get('kind')} source cannot be split: "
            "pass its files (e.g. 'hf://datasets/HuggingFaceFW/fineweb-edu/sample/100BT/*.parquet') or drop --tasks"
        )
    units = source.units(cfg.tasks)
    if len(units) < cfg.tasks:
        raise PrepareError(f"{cfg.source}: splits into only {len(units)} units (files, or parquet row groups), "
                           f"fewer than --tasks {cfg.tasks}; use --tasks <= {len(units)}")
    return units


def val_cut(cfg, files: FileSource, units: list[tuple[int, int | None]]) -> dict:
    """Where the validation split ends: ``{"unit", "row"}`` of the first row after the document the
    ``--val-tokens`` cut falls in, the val ``tokens`` (exactly ``--val-tokens``), the ``documents``
    that start in it and ``cut_document_tokens`` (the tokens of that last document, of which the
    first ``cut_document_tokens - rest`` are validation). PrepareError when the first file holds
    fewer tokens than ``--val-tokens`` (the module doc says why)."""
    first_file = [u for u, (f, _) in enumerate(units) if f == 0]
    V = cfg.val_tokens
    if V == 0:
        return {"unit": 0, "row": 0, "tokens": 0, "documents": 0, "cut_document_tokens": 0, "rest": 0}
    head = TaskSource(files, units, [(u, 0, None) for u in first_file])
    reader = DocReader(head, cfg, 0, 0, 0)
    total = docs = 0
    for chunk, (_, lens) in ordered_map(cfg, reader.chunks()):
        cum = total + np.cumsum(lens)
        k = int(np.searchsorted(cum, V, side="left"))  # the document the cut falls in (or ends at)
        if k < len(lens):
            u, r = head.locate(chunk.rows[k])
            return {"unit": u, "row": r + 1, "tokens": V, "documents": docs + k + 1,
                    "cut_document_tokens": int(lens[k]), "rest": int(cum[k] - V)}
        total, docs = int(cum[-1]), docs + len(lens)
    raise PrepareError(
        f"{files.files[0]}: the source's first file holds {total:,} tokens, fewer than --val-tokens {V:,}; with "
        "--tasks the validation split must lie in the first file (so every task knows which rows are "
        f"validation without reading it): pass --val-tokens {total:,} or less, or prepare without --tasks"
    )


def task_segments(task: int, tasks: int, n_units: int, cut: dict | None) -> list[Segment]:
    """Task ``task``'s stream: the validation documents (task 0 only), then the rest of its units
    (``cut`` None: the task owns no unit of the first file, so none of its rows is validation)."""
    segs: list[Segment] = []
    if cut is None:
        return [(u, 0, None) for u in range(task, n_units, tasks)]
    if task == 0:
        segs += [(u, 0, None) for u in range(min(cut["unit"], n_units))]
        if cut["unit"] < n_units and cut["row"]:
            segs.append((cut["unit"], 0, cut["row"]))
    for u in range(task, n_units, tasks):
        if u >= cut["unit"]:
            segs.append((u, cut["row"] if u == cut["unit"] else 0, None))
    return segs


def task_job(cfg, source: Source, manifest: dict | None):
    """The :class:`data_pipeline.job.Job` of task ``cfg.task_id`` (``manifest``: its part so far)."""
    units = _split_units(cfg, source)
    I, N = cfg.task_id, cfg.tasks
    mine = range(I, len(units), N)
    record = (manifest or {}).get("task")
    if isinstance(record, dict) and "val_cut" in record:
        cut = record["val_cut"]
        if cut is not None and "rest" not in cut:
            raise PrepareError(f"{cfg.out_dir}: {part_name(I, N)} was written by an older gpt2-prepare (validation "
                               "cut at whole documents); pass a new OUT_DIR")
    elif any(units[u][0] == 0 for u in mine):  # a unit of the first file: find where validation ends
        print(f"prepare: task {I} of {N}: finding the document the validation cut (after the first "
              f"{cfg.val_tokens:,} tokens of {source.files[0]}) falls in", flush=True)
        cut = val_cut(cfg, source, units)
    else:
        cut = None
    segs = task_segments(I, N, len(units), cut)
    said = "no validation documents"
    if cut is not None:
        rest = f"; the last one's other {cut['rest']:,} tokens open the training split" if cut.get("rest") else ""
        said = (f"validation: the first {cut['tokens']:,} tokens ({cut['documents']:,} documents{rest})"
                f"{', written here' if I == 0 else ''}")
    print(f"prepare: task {I} of {N}: {len(mine)} of {len(units)} units; {said}", flush=True)
    extra = {"task": {"id": I, "tasks": N, "units": len(units), "val_cut": cut}}
    return Job(cfg, TaskSource(source, units, segs), cut["tokens"] if I == 0 else 0, part_name(I, N),
               f"t{I:05d}_", extra, allow_empty=True)


def foreign_files(d: Path, cfg, ours: set[str] = frozenset()) -> str | None:
    """Why directory ``d`` (no manifest of this run's yet) cannot take this run's files; None if it
    can. ``ours``: shard files this run's own claim says it was writing (a run killed before it
    listed its first shard), which it rewrites."""
    parts = part_manifests(d)
    if cfg.tasks is None:
        if parts:
            return (f"{d}: holds the manifests of a prepare split into tasks ({parts[0].name}, ...); continue it "
                    "with --tasks N --task-id I (or gpt2-prepare --merge it), or pass a new OUT_DIR")
        stray = sorted(p.name for p in d.glob("*.bin") if p.name not in ours)
        if stray:
            return (f"{d}: holds shard files ({stray[0]}, ...) but no manifest.json; refusing to overwrite them, "
                    "pass an empty or new OUT_DIR")
        return None
    other = [p.name for p in parts if not p.name.endswith(f"-of-{cfg.tasks:05d}.json")]
    if other:
        return f"{d}: holds {other[0]}, a prepare split into another number of tasks; use its --tasks or a new OUT_DIR"
    for sibling in parts[:1]:  # another task's arguments: every task must run with the same
        theirs = (read_manifest(d, sibling.name) or {}).get("settings")
        if theirs is not None and theirs != cfg.settings():
            diffs = [f"{k}: {theirs.get(k)!r} here {v!r}" for k, v in cfg.settings().items() if theirs.get(k) != v]
            return (f"{d}: {sibling.name} was run with other arguments ({'; '.join(diffs)}); run every task "
                    "with the same arguments (or use a new OUT_DIR)")
    merged = read_manifest(d)
    if merged is not None and not isinstance((merged.get("settings") or {}).get("tasks"), int):
        return f"{d}: holds a prepare made in one piece ({MANIFEST_NAME}); pass a new OUT_DIR for --tasks"
    mine = sorted(p.name for p in d.glob(f"*_t{cfg.task_id:05d}_*.bin") if p.name not in ours)
    if mine:
        return (f"{d}: holds shards of task {cfg.task_id} ({mine[0]}, ...) but not its manifest "
                f"{part_name(cfg.task_id, cfg.tasks)}; refusing to overwrite them: remove them or pass a new OUT_DIR")
    return None


# ---- the merge ----------------------------------------------------------------------------------
def _read_parts(d: Path) -> tuple[int, dict[int, dict | None]]:
    """The number of tasks and each task's manifest (None: missing), or PrepareError."""
    found = {}
    for p in part_manifests(d):
        m = re.match(r"^manifest\.task-(\d+)-of-(\d+)\.json$", p.name)
        found[p.name] = (int(m.group(1)), int(m.group(2)))
    counts = sorted({n for _, n in found.values()})
    if not counts:
        raise PrepareError(f"{d}: no task manifests (manifest.task-*-of-*.json) to merge; run the tasks first: "
                           f"gpt2-prepare SOURCE {d} --tasks N --task-id I")
    if len(counts) > 1:
        raise PrepareError(f"{d}: holds tasks of splits into {' and '.join(map(str, counts))} tasks; keep one split "
                           "(remove the other's manifest.task-* files and shards) and merge again")
    n = counts[0]
    return n, {i: read_manifest(d, part_name(i, n)) for i in range(n)}


def _check_parts(d: Path, n: int, parts: dict[int, dict | None]) -> dict:
    """Every task present, complete, run alike, its shards there: the common settings, or PrepareError."""
    missing = [i for i, m in parts.items() if m is None]
    unfinished = [i for i, m in parts.items() if m is not None and not m.get("complete")]
    settings = next(m for m in parts.values() if m is not None).get("settings") or {}
    if missing or unfinished:
        said = [f"{_ids(missing)} missing" if missing else "", f"{_ids(unfinished)} incomplete" if unfinished else ""]
        todo = (missing + unfinished)[0] if len(missing + unfinished) == 1 else None
        raise PrepareError(
            f"{d}: cannot merge yet: {' and '.join(x for x in said if x)} (of {n}); run each (a rerun resumes): "
            f"{command_line(settings, str(d), task_id=todo)}, then gpt2-prepare --merge {d}"
        )
    first = parts[0]
    for i, m in parts.items():
        _check_identity(d, n, i, m, first)
        for key in ("settings", "tokenizer", "source"):
            if m.get(key) != first.get(key):
                raise PrepareError(f"{d}: task {i} was run with another {key} than task 0 ({part_name(i, n)}); "
                                   "rerun every task with the same arguments into a new OUT_DIR")
        cut = (m.get("task") or {}).get("val_cut")
        if cut is not None and cut != first["task"]["val_cut"]:
            raise PrepareError(f"{d}: task {i} found the validation documents ending elsewhere than task 0 did "
                               "(the source changed while the tasks ran); rerun every task into a new OUT_DIR")
        for s in m["shards"]:
            p = d / str(s.get("file"))
            size = p.stat().st_size if p.is_file() else None
            if size != shard_bytes(int(s.get("tokens") or 0)):
                what = "missing" if size is None else f"{size} bytes, expected {shard_bytes(int(s['tokens']))}"
                raise PrepareError(f"{p}: {what}; rerun its task (it rebuilds the shard): "
                                   f"{command_line(settings, str(d), task_id=i)}, then gpt2-prepare --merge {d}")
    return settings


def short(value) -> str:
    """A manifest's value quoted in a one-line error, rendered within bounds (``reprlib``)."""
    return reprlib.repr(value)


def _check_identity(d: Path, n: int, i: int, m: dict, first: dict) -> None:
    """What task manifest ``m`` says of itself agrees with where it was found (``part_name(i, n)``):
    its task id and count, the split into units task 0 made, and shards named as task ``i`` names
    them, in order, as many as its totals say -- a manifest copied over another's name is refused
    (its shards would be listed twice and the other task's dropped)."""
    name = part_name(i, n)
    fix = f"rerun task {i} into a new OUT_DIR (its manifest is not the one task {i} of {n} wrote)"
    record = m.get("task") if isinstance(m.get("task"), dict) else {}
    if record.get("id") != i or record.get("tasks") != n:
        said = f"task {short(record.get('id'))} of {short(record.get('tasks'))}" if record else "no task record"
        raise PrepareError(f"{d / name}: records {said}, not task {i} of {n} as its name says; {fix}")
    if record.get("units") != (first.get("task") or {}).get("units"):
        raise PrepareError(f"{d / name}: split the source into {short(record.get('units'))} units, task 0 into "
                           f"{short((first.get('task') or {}).get('units'))}; {fix}")
    shards = m.get("shards") if isinstance(m.get("shards"), list) else []
    counts = {"val": 0, "train": 0}
    for s in shards:
        split = s.get("split") if isinstance(s, dict) else None
        want = f"{split}_t{i:05d}_{counts.get(split, 0):06d}.bin" if split in counts else "val_/train_ shards"
        if split not in counts or s.get("file") != want:
            got = short(s.get("file")) if isinstance(s, dict) else short(s)
            raise PrepareError(f"{d / name}: lists {got} where task {i} writes {want}; {fix}")
        counts[split] += 1
    totals = m.get("totals") if isinstance(m.get("totals"), dict) else {}
    for split, k in counts.items():
        if totals.get(f"{split}_shards") != k:
            raise PrepareError(f"{d / name}: lists {k} {split} shards but its totals say "
                               f"{short(totals.get(f'{split}_shards'))}; {fix}")
    listed = {s["file"] for s in shards}
    unlisted = sorted(p.name for p in d.glob(f"*_t{i:05d}_*.bin") if p.name not in listed)
    if unlisted:
        raise PrepareError(f"{d / name}: does not list {unlisted[0]}, a shard of task {i} in this directory; {fix}")


def _ids(ids: list[int]) -> str:
    shown = ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")
    return f"task{'s' if len(ids) > 1 else ''} {shown}"


def merge(out_dir: str) -> dict:
    """``gpt2-prepare --merge OUT``: write OUT's manifest.json from its complete task manifests (see the
    module doc); returns it. Writes nothing when a check fails."""
    d = local_path(out_dir)
    if is_url(out_dir) or not d.is_dir():
        raise PrepareError(f"{out_dir}: not a local directory; --merge reads the task manifests in a directory here")
    check_out_dir(out_dir)
    n, parts = _read_parts(d)
    settings = _check_parts(d, n, parts)
    old = read_manifest(d)
    if old is not None and not isinstance((old.get("settings") or {}).get("tasks"), int):
        raise PrepareError(f"{d / MANIFEST_NAME}: a prepare made in one piece is there already; merge into a new "
                           "directory (move the tasks' files) or remove it")
    strip = ("resume",)
    val = [{**{k: v for k, v in s.items() if k not in strip}, "task": 0}
           for s in parts[0]["shards"] if s["split"] == "val"]
    train = [{**{k: v for k, v in s.items() if k not in strip}, "task": i}
             for i in range(n) for s in parts[i]["shards"] if s["split"] == "train"]
    totals = {k: sum(parts[i]["totals"][k] for i in range(n))
              for k in ("tokens", "val_tokens", "train_tokens", "documents", "rows_read", "skipped_empty",
                        "filtered", "val_shards", "train_shards")}
    if totals["train_tokens"] == 0:
        raise PrepareError(f"{d}: the tasks wrote no training tokens (all {totals['tokens']:,} are validation); "
                           "lower --val-tokens and run the tasks again into a new OUT_DIR")
    first = parts[0]
    manifest = {"version": MANIFEST_VERSION, "format": first.get("format"), "complete": True,
                "source": first.get("source"), "tokenizer": first.get("tokenizer"), "settings": settings,
                "tasks": n, "validation": {**first["task"]["val_cut"], "rule": "the first --val-tokens tokens of the "
                                           "source, cut mid-document as a plain prepare cuts them"},
                "shards": val + train, "totals": totals}
    write_manifest(d, manifest)
    print(f"prepare: merged {n} tasks into {d / MANIFEST_NAME}: {len(val) + len(train)} shards "
          f"({totals['val_tokens']:,} val + {totals['train_tokens']:,} train tokens, {totals['documents']:,} documents)")
    return manifest


# ---- all tasks on this machine -------------------------------------------------------------------
def task_argv(cfg, task: int, workers: int) -> list[str]:
    """The command line of task ``task`` of ``cfg`` as a process of its own."""
    args = [sys.executable, "-m", "data_pipeline.prepare", cfg.source, cfg.out_dir, "--tasks", str(cfg.tasks),
            "--task-id", str(task), "--workers", str(workers), "--backend", cfg.backend,
            "--chunk-chars", str(cfg.chunk_chars), "--no-progress"]
    for key, flag in SETTING_FLAGS.items():
        if getattr(cfg, key) is not None:
            args += [flag, str(getattr(cfg, key))]
    for f in cfg.filters:
        args += ["--filter", f]
    for f in cfg.data_files or []:
        args += ["--data-files", f]
    if cfg.txt_per_line:
        args.append("--txt-per-line")
    return args


def _stop_with_parent() -> None:
    """In a task process, before it runs (Linux): SIGTERM when the ``--local`` process that started
    it dies, however it dies (kill -9 too), so no task is left running orphaned; the task stops as
    on any SIGTERM, keeping its complete shards (a rerun resumes them)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_local(cfg) -> int:
    """``--tasks N --local``: the N tasks as processes here (``cfg.workers`` shared among them), then
    the merge. Returns the exit status (130 after Ctrl-C, which every task gets too)."""
    per = max(1, cfg.workers // cfg.tasks)
    procs = [subprocess.Popen(task_argv(cfg, i, per), preexec_fn=_stop_with_parent) for i in range(cfg.tasks)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:  # a terminal's Ctrl-C reached them already; a signal to this process alone did not
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        print("gpt2-prepare: interrupted; every task keeps its complete shards; rerun the same command to "
              "resume them (then it merges)", file=sys.stderr)
        return 130
    failed = [i for i, c in enumerate(codes) if c != 0]
    if failed:
        worst = 2 if all(codes[i] == 2 for i in failed) else 1
        print(f"gpt2-prepare: error: {_ids(failed)} of {cfg.tasks} failed (exit {', '.join(str(codes[i]) for i in failed)}"
              f"; see above); fix that and rerun the same command (finished tasks are not redone)", file=sys.stderr)
        return worst
    try:
        merge(cfg.out_dir)
    except PrepareError as e:
        print(f"gpt2-prepare: error: {e}", file=sys.stderr)
        return 2
    return 0

