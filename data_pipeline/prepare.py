"""Tokenize a document source into llm.c shards, in parallel and resumably.

    python -m data_pipeline.prepare SOURCE OUT_DIR [--shard-tokens N] [--val-tokens N] [--workers N] ...
    gpt2-prepare fineweb-edu-10B /data/edu10B              # streamed from the hub
    gpt2-prepare '/data/fineweb-edu/sample/10BT/*.parquet' /data/edu10B --filter 'int_score>=3'
    gpt2-prepare builtin:python-docs data/python-docs --shard-tokens 1000000 --val-tokens 65536
    gpt2-prepare SOURCE OUT --tasks 8 --task-id 3          # one of 8 independent tasks, then --merge OUT
    gpt2-prepare --index DIR                               # a manifest for llm.c shards made elsewhere

Split into tasks (``--tasks``, ``--local``, ``--merge``): ``data_pipeline/tasks.py``; indexing
other tools' shards (``--index``): ``data_pipeline/index.py``. Both write what this module's
readers read, and every check that can refuse runs before the first write.

What it writes (``data_pipeline.shards``): every document becomes ``<|endoftext|>`` (50256)
followed by its GPT-2 BPE tokens, and the documents are concatenated into one token stream
that is cut into shards of ``--shard-tokens`` tokens (a document may span two shards, as in
llm.c and build-nanogpt). The first ``--val-tokens`` tokens of the stream are the validation
split (``val_000000.bin`` ...), the rest train shards; the last shard of each split may be
shorter. ``manifest.json`` lists every shard (split, tokens, documents -- the number of
documents that *start* in it, i.e. its EOT count -- and sha256), the source, the tokenizer,
the settings, and once finished ``complete: true`` with ``totals``.

Text policy (never a crash; counts in the manifest's ``totals``):

* empty or whitespace-only documents, and a ``None`` text value: skipped, counted ``skipped_empty``;
* rows rejected by ``--filter``: skipped, counted ``filtered``;
* invalid UTF-8 bytes (in JSON lines, text files, binary columns): decoded with
  ``errors="replace"`` (U+FFFD);
* lone surrogates (e.g. ``"\\ud800"`` escapes in JSON): replaced by U+FFFD;
* a literal ``<|endoftext|>`` in the text: encoded as the ordinary text it is, never as the
  control token -- only the document separator is 50256;
* token ids are checked to fit uint16 before the cast;
* a missing text field, a non-text value in it, or a source with no documents: one clear error;
* a text file that is binary (NUL bytes, or over 10% of it invalid UTF-8), an empty or unreadable
  parquet file: one clear error naming the file.

Parallelism: chunks of documents are encoded by ``--workers`` threads (tiktoken releases the
GIL while it encodes) or processes (``--backend processes``); results are consumed in
submission order, so the output is byte-identical whatever the worker count or backend.

Resume: after each shard the manifest records where the stream stands -- the source row of
the document that crossed the shard boundary and how many of its tokens are already written
(the carry-over), plus the skip counters. A rerun with the same arguments skips the rows
already consumed, re-encodes that one document, drops the tokens already written and goes on;
the result is byte-identical to an uninterrupted run. Shards and the manifest are written
under temporary names and renamed. A finished job reruns as a no-op; different arguments
into the same directory are an error. Ctrl-C stops at a safe point (never between a shard and
its manifest entry) and prints the command that resumes (exit 130); so do SIGTERM and SIGUSR1
(a preempted or time-limited SLURM task). The manifest is first written with the first shard,
so a run refused before it (a bad row, a bad argument) leaves nothing that blocks the corrected
command; an unusable OUT_DIR (a file, under a file, read-only) is refused before anything.

Integrity: every shard's sha256 and largest token id are in the manifest. A rerun on an
existing directory first re-verifies the shards already written (``data_pipeline.integrity``);
if any is corrupt it says which and rebuilds from the first bad one (the resume point recorded
after the shard before it), rewriting the shards after it byte-identically. ``gpt2-prepare
--verify DIR`` checks a prepared directory without writing anything: one line per bad shard,
exit 2 if there is any.
"""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import sys
import time

import numpy as np

from data_pipeline import integrity
from data_pipeline.arguments import Parser
from data_pipeline.job import (
    EXIT_INTERRUPTED,
    MANIFEST_VERSION,
    DocReader,
    Job,
    PrepareConfig,
    PrepareError,
    ShardWriter,
    check_out_dir,
    command_line,
    ordered_map,
    stop_on_signals,
    tokenizer_info,
)
from data_pipeline.manifest import read_manifest
from data_pipeline.shards import (
    MANIFEST_NAME,
    ShardError,
    expected,
    is_url,
    join,
    local_path,
    part_name,
    shard_bytes,
    write_manifest,
)
from data_pipeline.sources import Source, SourceError, open_source


# ---- integrity ----------------------------------------------------------------------------------
def verify_shards(out_dir: str, manifest: dict) -> list[integrity.Mismatch]:
    """Re-hash every shard the manifest lists; the ones that differ from their record, in order."""
    d = local_path(out_dir)
    records = []
    for s in manifest["shards"]:
        name = str(s.get("file", ""))
        exp = expected(d / name, s) if name and "/" not in name and "\\" not in name else None
        if exp is None:
            raise ShardError(f"{d / MANIFEST_NAME}: shard entry {name!r} has no file name or sha256; "
                             "delete the directory and re-run prepare")
        records.append(exp)
    return integrity.verify_files(records)


def verify(out_dir: str) -> int:
    """``gpt2-prepare --verify DIR``: one line per bad shard on stderr; 0 if all are intact, else 2."""
    d = local_path(out_dir)
    if is_url(out_dir) or not d.is_dir():
        print(f"gpt2-prepare: error: {out_dir}: not a local directory; --verify checks a prepared directory "
              "on this machine", file=sys.stderr)
        return 2
    try:
        manifest = read_manifest(d)
        if manifest is None:
            raise ShardError(f"{d}: no {MANIFEST_NAME}, so nothing to verify against (shards written by other "
                             "tools carry no hashes); prepare the directory with gpt2-prepare")
        t0 = time.perf_counter()
        bad = verify_shards(out_dir, manifest)
    except ShardError as e:
        print(f"gpt2-prepare: error: {e}", file=sys.stderr)
        return 2
    n = len(manifest["shards"])
    size = sum(shard_bytes(s.get("tokens") or 0) for s in manifest["shards"])
    dt = time.perf_counter() - t0
    for b in bad:
        print(f"gpt2-prepare: bad shard {b.path}: {b.describe()}", file=sys.stderr)
    state = "complete" if manifest.get("complete") else "incomplete (rerun its command to finish it)"
    if bad:
        cmd = command_line(manifest.get("settings") or {}, out_dir)
        print(f"gpt2-prepare: {d}: {len(bad)} of {n} shards are bad; rebuild them with: {cmd}", file=sys.stderr)
        return 2
    print(f"prepare: {d}: all {n} shards match {MANIFEST_NAME} ({size / 1e6:,.0f} MB in {dt:.1f}s); "
          f"the directory is {state}")
    return 0


def _repair(cfg: PrepareConfig, manifest: dict, name: str = MANIFEST_NAME) -> dict:
    """Re-verify the shards already written; keep those before the first bad one and resume there."""
    if is_url(cfg.out_dir) or not manifest["shards"]:
        return manifest
    size = sum(shard_bytes(s.get("tokens") or 0) for s in manifest["shards"])
    print(f"prepare: {cfg.out_dir}: re-verifying the {len(manifest['shards'])} shards already written "
          f"({size / 1e9:.2f} GB) against {name}", flush=True)
    bad = verify_shards(cfg.out_dir, manifest)
    if not bad:
        return manifest
    names = [b.path.name for b in bad]
    first = next(i for i, s in enumerate(manifest["shards"]) if s["file"] == names[0])
    print(f"prepare: {cfg.out_dir}: {len(bad)} shard(s) do not match {name} "
          f"({'; '.join(f'{b.path.name}: {b.describe()}' for b in bad[:3])}{' ...' if len(bad) > 3 else ''}); "
          f"rebuilding from {names[0]} (the shards after it are rewritten identically)", flush=True)
    manifest = dict(manifest, shards=manifest["shards"][:first], complete=False)
    manifest.pop("totals", None)
    write_manifest(cfg.out_dir, manifest, name)
    return manifest


# ---- the run ------------------------------------------------------------------------------------
def _new_manifest(job: Job) -> dict:
    return {"version": MANIFEST_VERSION,
            "format": "llm.c token shards: 256 x int32 header (20240520, 1, n) + n x uint16",
            "complete": False, "source": job.source.describe(), "tokenizer": tokenizer_info(),
            "settings": job.cfg.settings(), **job.extra, "shards": []}


def _check_existing(cfg: PrepareConfig, manifest: dict | None, name: str, ours: set[str] = frozenset()) -> None:
    """A rerun continues only what the same arguments started; a directory holding something else
    (shards without a manifest, a prepare split into another number of tasks) is refused."""
    if manifest is None:
        if is_url(cfg.out_dir) or not local_path(cfg.out_dir).is_dir():
            return
        from data_pipeline.tasks import foreign_files

        problem = foreign_files(local_path(cfg.out_dir), cfg, ours)
        if problem:
            raise PrepareError(problem)
        return
    old = manifest.get("settings")
    new = cfg.settings()
    if old != new or manifest.get("tokenizer") != tokenizer_info():
        diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new if (old or {}).get(k) != new.get(k)]
        if manifest.get("tokenizer") != tokenizer_info():
            diffs.append("tokenizer changed")
        raise PrepareError(
            f"{join(cfg.out_dir, name)}: this directory was prepared with different arguments "
            f"({'; '.join(diffs) or 'unknown settings'}); use a new OUT_DIR or the original arguments"
        )


def _existing(cfg: PrepareConfig, name: str) -> dict | None:
    """The manifest a rerun continues (its arguments checked, its shards re-verified), or None."""
    manifest = read_manifest(cfg.out_dir, name)
    ours = set()
    if manifest is not None and not manifest["shards"] and not manifest.get("complete"):
        if manifest.get("settings") == cfg.settings() and isinstance(manifest.get("writing"), str):
            ours.add(manifest["writing"])  # the first shard of a run killed before it was listed: rewritten
        manifest = None  # a claim without a shard holds nothing: it never blocks a corrected rerun
    _check_existing(cfg, manifest, name, ours)
    if manifest is not None:
        manifest = _repair(cfg, manifest, name)  # never trust a shard already written: re-verify it
    return manifest


def _clean_temps(job: Job) -> None:
    if is_url(job.cfg.out_dir):
        return
    for pattern in job.temp_patterns():
        for p in local_path(job.cfg.out_dir).glob(pattern):
            p.unlink(missing_ok=True)


def run(cfg: PrepareConfig) -> dict:
    """Prepare ``cfg.source`` into ``cfg.out_dir`` (with ``cfg.tasks``: task ``cfg.task_id`` of it);
    returns the manifest written. Every check that can refuse runs before the first write."""
    cfg.validate()
    check_out_dir(cfg.out_dir)
    name = MANIFEST_NAME if cfg.tasks is None else part_name(cfg.task_id, cfg.tasks)
    manifest = _existing(cfg, name)
    if manifest is not None and manifest.get("complete"):
        t = manifest["totals"]
        print(f"prepare: {join(cfg.out_dir, name)} is already complete ({len(manifest['shards'])} shards, "
              f"{t['tokens']:,} tokens); nothing to do")
        return manifest
    source = open_source(cfg.source, text_field=cfg.text_field, filters=cfg.filters,
                         txt_per_line=cfg.txt_per_line, hf_config=cfg.hf_config, hf_split=cfg.hf_split,
                         data_files=cfg.data_files)
    if cfg.tasks is None:
        job = Job(cfg, source, cfg.val_tokens)
    else:
        from data_pipeline.tasks import task_job

        job = task_job(cfg, source, manifest)
    return write(job, manifest)


def write(job: Job, manifest: dict | None) -> dict:
    """Run ``job`` to the end of its source, continuing ``manifest`` (None: from the start)."""
    cfg = job.cfg
    _clean_temps(job)
    manifest = manifest if manifest is not None else _new_manifest(job)
    writer = ShardWriter(job, manifest)
    r = manifest["shards"][-1]["resume"] if manifest["shards"] else {}
    start_row, skip_tokens = r.get("row", 0), r.get("skip_tokens", 0)
    if manifest["shards"]:
        print(f"prepare: resuming {join(cfg.out_dir, job.manifest_name)} after {len(manifest['shards'])} shards "
              f"({writer.pos:,} tokens) at source row {start_row}")
    reader = DocReader(job.source, cfg, start_row, r.get("skipped_empty", 0), r.get("filtered", 0))
    t0 = time.perf_counter()
    n_tok, stop = _stream(job, writer, reader, start_row, skip_tokens)
    end = stop if stop is not None else (reader.row, reader.empty, reader.filtered)
    writer.finish(end)
    return _finish(job, manifest, writer, end, n_tok, time.perf_counter() - t0)


def _stream(job: Job, writer: ShardWriter, reader: DocReader, start_row: int, skip_tokens: int,
            ) -> tuple[int, tuple[int, int, int] | None]:
    """Encode the reader's documents in order and hand their tokens to the writer, dropping the
    ``skip_tokens`` of the document at ``start_row`` a previous run already wrote. Returns the tokens
    written and, when ``--max-tokens`` cut the stream, (rows consumed, empty, filtered) there."""
    cfg = job.cfg
    stream_pos = writer.pos - skip_tokens  # stream position of the first re-read document's EOT
    limit = cfg.max_tokens
    stop: tuple[int, int, int] | None = None
    bar = _progress(cfg, job.source, writer.pos)
    t0, n_docs, n_tok, first = time.perf_counter(), 0, 0, True
    for chunk, (flat, lens) in ordered_map(cfg, reader.chunks()):
        if first and skip_tokens and (chunk.rows[0] != start_row or lens[0] < skip_tokens):
            # The document the last shard ended in is not where the manifest says: the source changed.
            raise PrepareError(
                f"{cfg.source}: source row {start_row} is not the document of {skip_tokens}+ tokens the last run "
                f"ended in; the source changed since {cfg.out_dir} was started, use a new OUT_DIR"
            )
        first = False
        ends = stream_pos + np.cumsum(lens)
        starts = ends - lens
        meta = np.stack([starts, ends, np.asarray(chunk.rows), np.asarray(chunk.empty_before),
                         np.asarray(chunk.filtered_before)])
        lo = max(writer.pos + writer.buf_len - stream_pos, 0)  # tokens of this chunk already written
        hi = flat.size
        if limit is not None and stream_pos + hi >= limit:
            hi = limit - stream_pos
            k = int(np.searchsorted(ends, limit, side="left"))  # last document inside the cap
            stop = (int(chunk.rows[k]) + 1, int(chunk.empty_before[k]), int(chunk.filtered_before[k]))
            meta = meta[:, : k + 1]
        writer.add(flat[lo:hi], meta)
        stream_pos = int(ends[-1])
        n_docs += meta.shape[1]
        n_tok += max(hi - lo, 0)
        if bar is not None:
            bar.update(max(hi - lo, 0) if limit is not None else meta.shape[1])
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"{n_docs / dt:,.0f} doc/s, {n_tok / dt:,.0f} tok/s", refresh=False)
        if stop is not None:
            break
    if bar is not None:
        bar.close()
    return n_tok, stop


def _finish(job: Job, manifest: dict, writer: ShardWriter, end: tuple[int, int, int], n_tok: int,
            dt: float) -> dict:
    """Check the stream held what a dataset needs, then mark the manifest complete with its totals."""
    cfg, total = job.cfg, writer.pos
    rows, empty, filtered = end
    if total == 0 and not job.allow_empty:
        raise SourceError(
            f"{cfg.source}: no documents (rows read: {rows}, empty: {empty}, filtered: {filtered}); check the "
            "source, --text-field and --filter"
        )
    val = sum(s["tokens"] for s in manifest["shards"] if s["split"] == "val")
    if total - val == 0 and not job.allow_empty:
        raise PrepareError(
            f"{cfg.source}: the source ran out after {total:,} tokens, all of them validation "
            f"(--val-tokens {cfg.val_tokens:,}); lower --val-tokens so train shards remain"
        )
    manifest["complete"] = True
    manifest["totals"] = {
        "tokens": total, "val_tokens": val, "train_tokens": total - val,
        "documents": sum(s["documents"] for s in manifest["shards"]),
        "rows_read": rows, "skipped_empty": empty, "filtered": filtered,
        "val_shards": sum(s["split"] == "val" for s in manifest["shards"]),
        "train_shards": sum(s["split"] == "train" for s in manifest["shards"]),
    }
    write_manifest(cfg.out_dir, manifest, job.manifest_name)
    print(f"prepare: wrote {len(manifest['shards'])} shards ({val:,} val + {total - val:,} train tokens, "
          f"{manifest['totals']['documents']:,} documents) to {join(cfg.out_dir, job.manifest_name)} in "
          f"{dt:.1f}s ({n_tok / max(dt, 1e-9):,.0f} tok/s this run)")
    return manifest


def _progress(cfg: PrepareConfig, source: Source, done_tokens: int):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    if cfg.max_tokens is not None:
        return tqdm(total=cfg.max_tokens, initial=done_tokens, unit="tok", unit_scale=True,
                    desc="prepare", dynamic_ncols=True)
    return tqdm(total=source.num_rows(), unit="doc", unit_scale=True, desc="prepare", dynamic_ncols=True)


# ---- CLI ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gpt2-prepare",
        description="Tokenize a document source (HF dataset, files, fsspec URL, builtin:python-docs) into "
                    "llm.c-format GPT-2 token shards with a manifest; parallel and resumable, in one process or "
                    "as N independent tasks (--tasks) merged afterwards (--merge).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", nargs="?",
                   help="fineweb-edu-10B | fineweb-edu-100B | fineweb-10B | fineweb-100B | builtin:python-docs "
                        "| datasets:ID | owner/name (hub id) | local path, glob or directory of .parquet/"
                        ".jsonl[.gz|.zst]/.txt | fsspec URL (s3://, gs://, hf://, https://, file://, memory://)")
    p.add_argument("out_dir", metavar="OUT_DIR", nargs="?", help="output directory (local path or fsspec URL)")
    p.add_argument("--verify", metavar="DIR", default=argparse.SUPPRESS,
                   help="check every shard of the prepared directory DIR against its manifest's sha256 and "
                        "exit (0: all intact; 2: one line per bad shard); writes nothing")
    p.add_argument("--tasks", type=int, default=None, metavar="N",
                   help="split the work into N independent tasks (by file, or parquet row group); each writes "
                        "its own shards and manifest into OUT_DIR and resumes on its own; then --merge OUT_DIR")
    p.add_argument("--task-id", type=int, default=None, metavar="I", help="with --tasks: run task I (0 .. N-1)")
    p.add_argument("--local", action="store_true", default=argparse.SUPPRESS,
                   help="with --tasks N: run all N tasks here as processes (sharing --workers), then merge")
    p.add_argument("--merge", metavar="DIR", default=argparse.SUPPRESS,
                   help="write DIR's manifest.json from its complete task manifests (refused, writing nothing, "
                        "while a task is missing or incomplete)")
    p.add_argument("--index", metavar="DIR", default=argparse.SUPPRESS,
                   help="write a manifest for a directory of llm.c-format token shards made by another tool "
                        "(llm.c's fineweb.py, modded-nanogpt's cached shards): headers, sizes, token range and "
                        "sha256 checked; validation shards: --val-glob")
    p.add_argument("--val-glob", default=argparse.SUPPRESS,
                   help="with --index: the file names of the validation shards (default: llm.c's '*_val_*')")
    p.add_argument("--text-field", default="text", help="field holding the document text")
    p.add_argument("--filter", dest="filters", action="append", default=[], metavar="EXPR",
                   help="keep rows where FIELD OP LITERAL holds, e.g. 'int_score>=3' (repeatable: all must hold)")
    p.add_argument("--txt-per-line", action="store_true", help=".txt files: one document per non-empty line "
                   "instead of one per file")
    p.add_argument("--hf-config", default=None, help="dataset config name for hub sources (presets set theirs)")
    p.add_argument("--hf-split", default="train", help="dataset split for hub/datasets sources")
    p.add_argument("--data-files", action="append", default=None, metavar="GLOB",
                   help="data_files for a datasets: builder, e.g. datasets:parquet --data-files 'x/*.parquet'")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--val-tokens", type=int, default=100_000_000,
                   help="the first this-many tokens form the validation split, cut mid-document (with --tasks "
                        "too; there they must lie in the source's first file)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens in total")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="parallel encoders (with --local: shared among the tasks)")
    p.add_argument("--backend", choices=("threads", "processes"), default="threads",
                   help="how the workers run (the output is identical either way)")
    p.add_argument("--chunk-chars", type=int, default=1_000_000,
                   help="characters of text per work item (speed only)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="hide the progress bar (shown by default)")
    return p


def _other_mode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[str, str] | None:
    """(mode, DIR) for --verify / --merge / --index, which take a directory and no SOURCE."""
    modes = [(m, v) for m in ("verify", "merge", "index") if (v := vars(args).pop(m, None)) is not None]
    if len(modes) > 1:
        parser.error("--verify, --merge and --index each take a DIR; give one of them")
    if modes and args.source is not None:
        parser.error(f"--{modes[0][0]} DIR takes no SOURCE / OUT_DIR")
    return modes[0] if modes else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    other = _other_mode(parser, args)
    if other is not None and other[0] == "verify":
        try:
            return verify(other[1])
        except KeyboardInterrupt:
            print(f"\ngpt2-prepare: interrupted (Ctrl-C); --verify {other[1]} read only, changed nothing: rerun it",
                  file=sys.stderr)
            return EXIT_INTERRUPTED
    if other is None and (args.source is None or args.out_dir is None):
        parser.error("SOURCE and OUT_DIR are required (or --verify / --merge / --index DIR)")
    local, val_glob = vars(args).pop("local", False), vars(args).pop("val_glob", "*_val_*")
    if local and (args.tasks is None or args.task_id is not None):
        parser.error("--local runs every task here: give --tasks N and no --task-id")
    if local:
        args.task_id = 0  # the settings every task shares are checked as task 0's; each then runs as itself
    cfg = None if other is not None else PrepareConfig(**vars(args))
    try:
        with stop_on_signals():
            return _dispatch(other, cfg, local, val_glob, args.workers)
    except KeyboardInterrupt:
        if cfg is not None:
            return _interrupted(cfg, argv)
        print(f"\ngpt2-prepare: interrupted (Ctrl-C); --{other[0]} writes its manifest whole or not at all: rerun "
              f"gpt2-prepare --{other[0]} {other[1]}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (PrepareError, SourceError, ShardError) as e:
        print(f"gpt2-prepare: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        return _os_error(e)


def _dispatch(other: tuple[str, str] | None, cfg: PrepareConfig | None, local: bool, val_glob: str,
              workers: int) -> int:
    """Run the mode main() parsed: --merge DIR, --index DIR, --tasks N --local, or a (task of a) prepare."""
    if other is not None and other[0] == "merge":
        from data_pipeline.tasks import merge

        merge(other[1])
    elif other is not None:
        from data_pipeline.index import index

        index(other[1], val_glob, workers=workers)
    elif local:
        from data_pipeline.tasks import run_local

        cfg.validate()
        check_out_dir(cfg.out_dir)
        return run_local(cfg)
    else:
        run(cfg)
    return 0


# errno values that mean the output place is unusable as given: an input fault (exit 2), not a
# condition that goes away (a full disk: exit 1, free space and rerun).
_INPUT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


def _os_error(e: OSError) -> int:
    """A full disk, a permission problem, a vanished mount: say where, and how to go on."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in _INPUT_ERRNOS:
        print(f"gpt2-prepare: error:{where}: {e.strerror or e} (errno {e.errno}); choose an OUT_DIR this user can "
              "write (a directory, not a file)", file=sys.stderr)
        return 2
    print(f"gpt2-prepare: error:{where}: {e.strerror or e} (errno {e.errno}); fix that (e.g. free space), "
          "then rerun the same command to resume after the last complete shard", file=sys.stderr)
    return 1


def _interrupted(cfg: PrepareConfig, argv: list[str] | None) -> int:
    """Ctrl-C: every shard the manifest lists is complete; say so and how to go on."""
    name = MANIFEST_NAME if cfg.tasks is None else part_name(cfg.task_id, cfg.tasks)
    try:
        manifest = read_manifest(cfg.out_dir, name)
    except (ShardError, OSError):
        manifest = None
    done = len(manifest["shards"]) if manifest else 0
    tokens = sum(s.get("tokens", 0) for s in manifest["shards"]) if manifest else 0
    args = sys.argv[1:] if argv is None else argv
    print(f"\ngpt2-prepare: interrupted; {join(cfg.out_dir, name)} keeps {done} complete shards ({tokens:,} tokens); "
          f"resume with: {shlex.join(['gpt2-prepare', *args])}", file=sys.stderr)
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
