"""Document sources: Hugging Face datasets (streamed), local files and globs, fsspec URLs, built-ins.

A source is named by one string (``SOURCE`` of ``gpt2-prepare``), resolved in this order:

================================  ===========================================================
``builtin:python-docs``           the embedded offline corpus (``data_pipeline.embedded``)
``fineweb-edu-10B`` ...           presets: a Hugging Face dataset id + config (``PRESETS``)
``datasets:ID``                   any ``datasets`` loader, streamed: a hub id
                                  (``datasets:HuggingFaceFW/fineweb --hf-config sample-10BT``)
                                  or a builder with files (``datasets:parquet --data-files 'x/*.parquet'``)
``s3://b/x/*.parquet`` ...        fsspec URLs; protocols limited to ``ALLOWED_PROTOCOLS``
``data/*.jsonl.zst``, ``dir/``    local files, globs or directories (searched recursively)
``owner/name``                    a hub dataset id, when no such local path exists
================================  ===========================================================

File formats, from the name: ``.parquet``; JSON lines ``.jsonl`` / ``.json`` / ``.ndjson``
(optionally ``.gz`` or ``.zst``); text ``.txt`` (optionally compressed) -- one document per
file, or one per non-empty line with ``txt_per_line``. Files are read in sorted order, rows in
file order, so the document order -- and everything ``prepare`` writes -- is reproducible.

Rows are dicts. FineWeb rows carry ``text, id, dump, url, date, file_path, language,
language_score, token_count``; FineWeb-Edu adds ``score, int_score`` and has no ``date``.
Only the text field (``text`` by default) and the fields that filters mention are read from
parquet. A filter is ``FIELD OP LITERAL`` with OP one of ``>= <= > < == !=`` (``int_score>=3``,
``language=="en"``); the literal is parsed with ``ast.literal_eval``, never evaluated as code.

Every source supports ``iter_rows(start)``: rows from row index ``start`` on, which ``prepare``
uses to resume. Parquet skips whole files and row groups through the footer metadata.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

PRESETS: dict[str, tuple[str, str]] = {
    "fineweb-edu-10B": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "fineweb-edu-100B": ("HuggingFaceFW/fineweb-edu", "sample-100BT"),
    "fineweb-10B": ("HuggingFaceFW/fineweb", "sample-10BT"),
    "fineweb-100B": ("HuggingFaceFW/fineweb", "sample-100BT"),
}
BUILTINS = ("python-docs",)
ALLOWED_PROTOCOLS = frozenset({"file", "s3", "gs", "gcs", "hf", "http", "https", "memory"})
FORMATS = ("parquet", "jsonl", "txt")
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_GLOB_CHARS = set("*?[")


class SourceError(ValueError):
    """A source that cannot be read; one line naming the source/file and what to pass instead."""


# ---- filters -----------------------------------------------------------------------------------
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq,
    "!=": operator.ne, ">": operator.gt, "<": operator.lt,
}
_FILTER_RE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")


@dataclass(frozen=True)
class RowFilter:
    """``field op value``, e.g. ``int_score >= 3``; parsed without eval."""

    field: str
    op: str
    value: Any

    @classmethod
    def parse(cls, expr: str) -> RowFilter:
        m = _FILTER_RE.match(expr)
        if not m:
            raise SourceError(
                f"filter {expr!r}: expected FIELD OP LITERAL with OP in >= <= > < == != (e.g. 'int_score>=3')"
            )
        field, op, lit = m.groups()
        try:
            value = ast.literal_eval(lit)
        except (ValueError, SyntaxError):
            if not re.fullmatch(r"[\w.-]+", lit):
                raise SourceError(
                    f"filter {expr!r}: {lit!r} is not a literal; quote strings, e.g. {field}{op}\"{lit}\""
                ) from None
            value = lit  # a bare word: a string
        if not isinstance(value, (int, float, str, bool, type(None))):
            raise SourceError(f"filter {expr!r}: the literal must be a number, string, bool or None")
        return cls(field, op, value)

    def __call__(self, row: dict) -> bool:
        try:
            v = row[self.field]
        except KeyError:
            raise SourceError(
                f"filter '{self}': rows have no field '{self.field}' (fields: {', '.join(sorted(row))})"
            ) from None
        if v is None:
            return self.op == "!=" and self.value is not None
        try:
            return bool(_OPS[self.op](v, self.value))
        except TypeError:
            raise SourceError(
                f"filter '{self}': cannot compare field value {v!r} with {self.value!r}"
            ) from None

    def __str__(self) -> str:
        return f"{self.field}{self.op}{self.value!r}"


# ---- sources -----------------------------------------------------------------------------------
class Source:
    """A reproducible sequence of rows (dicts)."""

    spec: str

    def iter_rows(self, start: int = 0) -> Iterator[dict]:
        raise NotImplementedError

    def num_rows(self) -> int | None:
        """Total rows when cheaply known (parquet footers, dataset info), else None."""
        return None

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": type(self).__name__}


class BuiltinSource(Source):
    def __init__(self, name: str) -> None:
        if name not in BUILTINS:
            raise SourceError(f"builtin:{name}: unknown built-in source; available: "
                              + ", ".join(f"builtin:{b}" for b in BUILTINS))
        self.name = name
        self.spec = f"builtin:{name}"

    def iter_rows(self, start: int = 0) -> Iterator[dict]:
        import itertools

        from data_pipeline import embedded  # lazy: the corpus scan is work, not import-time

        return itertools.islice(embedded.iter_documents(), start, None)

    def describe(self) -> dict:
        import platform

        return {"spec": self.spec, "kind": "builtin", "python": platform.python_version()}


class HFDatasetSource(Source):
    """``datasets.load_dataset(path, name, split=..., streaming=True)``, rows in stream order."""

    def __init__(self, path: str, name: str | None = None, split: str = "train",
                 data_files: str | list[str] | None = None, spec: str | None = None,
                 columns: list[str] | None = None) -> None:
        self.path, self.name, self.split, self.data_files = path, name, split, data_files
        self.columns = columns
        self.spec = spec or f"datasets:{path}"

    def _offline_error(self, e: BaseException) -> SourceError:
        what = self.path + (f" (config {self.name})" if self.name else "")
        hint = self.path.split("/")[-1]
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        return SourceError(
            f"{self.spec}: cannot stream {what} from the Hugging Face hub ({type(e).__name__}: {first}); "
            f"offline? download its parquet files elsewhere and pass a local path or glob instead, "
            f"e.g. gpt2-prepare '/data/{hint}/{self.name or 'data'}/*.parquet' OUT_DIR"
        )

    def _dataset(self):
        import datasets

        kwargs: dict[str, Any] = {"split": self.split, "streaming": True}
        if self.data_files is not None:
            kwargs["data_files"] = self.data_files
        try:
            return datasets.load_dataset(self.path, self.name, **kwargs)
        except FileNotFoundError as e:
            if self.data_files is not None:
                raise SourceError(f"{self.spec}: no data files match {self.data_files!r} ({e})") from None
            raise self._offline_error(e) from None
        except Exception as e:  # the hub raises many types (ConnectionError, OfflineModeIsEnabled, ...)
            if self.data_files is not None and not _looks_like_network(e):
                raise SourceError(f"{self.spec}: datasets could not load {self.data_files!r}: {e}") from None
            raise self._offline_error(e) from None

    def iter_rows(self, start: int = 0) -> Iterator[dict]:
        ds = self._dataset()
        if self.columns:
            try:
                ds = ds.select_columns(self.columns)
            except Exception:  # noqa: BLE001 - unknown features: keep all columns, the text check names it
                pass
        if start:
            ds = ds.skip(start)
        it = iter(ds)
        try:
            first = next(it)
        except StopIteration:
            return
        except Exception as e:
            if self.data_files is None or _looks_like_network(e):
                raise self._offline_error(e) from None
            raise
        yield first
        yield from it

    def num_rows(self) -> int | None:
        try:
            info = self._dataset().info
            return int(info.splits[self.split].num_examples) if info.splits else None
        except Exception:  # noqa: BLE001 - only for the progress bar
            return None

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": "datasets", "path": self.path, "name": self.name,
                "split": self.split, "data_files": self.data_files}


def _looks_like_network(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in ("offline", "connection", "connect", "network", "resolve", "timed out",
                                   "hub", "http", "couldn't reach", "max retries"))


class FileSource(Source):
    """Local or fsspec files (parquet, JSON lines, text), in sorted order."""

    def __init__(self, spec: str, files: list[str], fs, columns: list[str] | None = None,
                 txt_per_line: bool = False) -> None:
        self.spec, self.files, self.fs = spec, files, fs
        self.columns = columns
        self.txt_per_line = txt_per_line
        self._parquet_rows: dict[str, list[int]] = {}

    # -- per format ----------------------------------------------------------------------------------
    @staticmethod
    def _parquet_file(f, path: str):
        """``pq.ParquetFile`` of the open file ``f``; an unreadable one is one line naming ``path``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(f)
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
            size = getattr(f, "size", None)
            what = "empty (0 bytes)" if size == 0 else f"not a readable parquet file ({str(e).splitlines()[0]})"
            raise SourceError(f"{path}: {what}; remove or replace it (a partial download?) and rerun") from None

    def _row_groups(self, path: str) -> list[int]:
        if path not in self._parquet_rows:
            with self.fs.open(path, "rb") as f:
                md = self._parquet_file(f, path).metadata
                self._parquet_rows[path] = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        return self._parquet_rows[path]

    def _parquet(self, path: str, skip: int, groups: tuple[int, int] | None = None) -> Iterator[dict]:
        """Rows of ``path`` from row ``skip`` on (of row groups ``[lo, hi)`` only, with ``groups``)."""
        with self.fs.open(path, "rb") as f:
            pf = self._parquet_file(f, path)
            names = pf.schema_arrow.names
            cols = None
            if self.columns:
                missing = [c for c in self.columns if c not in names]
                if missing:
                    raise SourceError(
                        f"{path}: no column {missing[0]!r} (columns: {', '.join(names)}); "
                        "pass --text-field NAME (or fix the --filter)"
                    )
                cols = self.columns
            lo, hi = groups if groups is not None else (0, len(self._row_groups(path)))
            sizes = self._row_groups(path)[lo:hi]
            first = 0
            while first < len(sizes) and skip >= sizes[first]:
                skip -= sizes[first]
                first += 1
            if first == len(sizes):
                return
            for batch in pf.iter_batches(batch_size=2048, row_groups=list(range(lo + first, hi)),
                                         columns=cols, use_threads=False):
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                if skip:
                    batch = batch.slice(skip)
                    skip = 0
                data = {name: batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}
                keys = list(data)
                for values in zip(*(data[k] for k in keys)):
                    yield dict(zip(keys, values))

    @contextlib.contextmanager
    def _open_text(self, path: str) -> Iterator[io.BufferedIOBase]:
        """A binary, line-iterable stream of ``path``, decompressed by its suffix."""
        comp = _COMPRESSIONS.get(_suffix(path))
        with self.fs.open(path, "rb", compression=comp) as f:
            # zstandard's reader cannot iterate lines; a BufferedReader over it can.
            yield io.BufferedReader(f) if comp == "zstd" else f

    def _jsonl(self, path: str, skip: int) -> Iterator[dict]:
        with self._open_text(path) as f:
            n = 0
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                if n < skip:
                    n += 1
                    continue
                n += 1
                try:
                    row = json.loads(raw.decode("utf-8", errors="replace"))
                except json.JSONDecodeError as e:
                    raise SourceError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from None
                if not isinstance(row, dict):
                    raise SourceError(f"{path}:{lineno}: a JSON lines row must be an object, got {type(row).__name__}")
                yield row

    def _txt(self, path: str, skip: int) -> Iterator[dict]:
        with self._open_text(path) as f:
            data = f.read()
        text = data.decode("utf-8", errors="replace")
        check_text(path, data, text)
        if not self.txt_per_line:
            if skip == 0:
                yield {"text": text, "file": path}
            return
        lines = [ln for ln in text.splitlines() if ln.strip()]
        for ln in lines[skip:]:
            yield {"text": ln}

    def _count(self, path: str) -> int | None:
        fmt = file_format(path)
        if fmt == "parquet":
            return sum(self._row_groups(path))
        if fmt == "txt" and not self.txt_per_line:
            return 1
        return None

    def iter_rows(self, start: int = 0) -> Iterator[dict]:
        readers = {"parquet": self._parquet, "jsonl": self._jsonl, "txt": self._txt}
        skip = start
        for path in self.files:
            if skip:
                n = self._count(path)
                if n is not None and skip >= n:
                    skip -= n
                    continue
            for row in readers[file_format(path)](path, skip):
                skip = 0
                yield row
            if skip:  # the skip ran past this file (JSON lines / txt lines: counted by reading)
                skip -= self._rows_in(path)

    def _rows_in(self, path: str) -> int:
        fmt = file_format(path)
        n = self._count(path)
        if n is not None:
            return n
        if fmt == "jsonl":
            with self._open_text(path) as f:
                return sum(1 for raw in f if raw.strip())
        with self._open_text(path) as f:
            return sum(1 for ln in f.read().decode("utf-8", errors="replace").splitlines() if ln.strip())

    # -- units: the pieces a prepare split into tasks hands out (data_pipeline/tasks.py) ---------------
    def units(self, tasks: int) -> list[tuple[int, int | None]]:
        """The source in order as (file index, row group | None = the whole file): whole files when
        there are at least ``tasks`` of them, else every parquet row group on its own."""
        if len(self.files) >= tasks:
            return [(f, None) for f in range(len(self.files))]
        out: list[tuple[int, int | None]] = []
        for f, path in enumerate(self.files):
            if file_format(path) == "parquet":
                out += [(f, g) for g in range(len(self._row_groups(path)))]
            else:
                out.append((f, None))
        return out

    def unit_rows(self, unit: tuple[int, int | None], start: int = 0) -> Iterator[dict]:
        """The rows of ``unit`` from its row ``start`` on."""
        f, g = unit
        path = self.files[f]
        if g is not None:
            return self._parquet(path, start, (g, g + 1))
        return {"parquet": self._parquet, "jsonl": self._jsonl, "txt": self._txt}[file_format(path)](path, start)

    def unit_count(self, unit: tuple[int, int | None], exact: bool = False) -> int | None:
        """Rows in ``unit``: from metadata (parquet, whole text files), by reading only when ``exact``."""
        f, g = unit
        if g is not None:
            return self._row_groups(self.files[f])[g]
        return self._rows_in(self.files[f]) if exact else self._count(self.files[f])

    def num_rows(self) -> int | None:
        total = 0
        for path in self.files:
            n = self._count(path)
            if n is None:
                return None
            total += n
        return total

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": "files", "files": len(self.files),
                "first": self.files[0], "last": self.files[-1], "txt_per_line": self.txt_per_line}


# A few stray bytes are replaced (U+FFFD) as the text policy says; over 10% of it is not text at all.
_MAX_BAD_FRACTION = 0.10


def check_text(path: str, data: bytes, text: str) -> None:
    """Refuse binary data read as text: NUL bytes, or more than 10% of characters undecodable."""
    if b"\x00" in data[: 1 << 20]:
        why = "holds NUL bytes"
    else:
        bad = text.count("\ufffd") - data.count("\ufffd".encode())  # replacements made by decoding
        if not text or bad <= _MAX_BAD_FRACTION * len(text):
            return
        why = f"is {bad / len(text):.0%} invalid UTF-8"
    raise SourceError(
        f"{path}: {why}, so it is binary data, not UTF-8 text; pass text (.txt, .jsonl) or .parquet files, "
        "or fix the glob so it does not match it"
    )


# ---- resolution --------------------------------------------------------------------------------
def _suffix(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    return "." + name.rsplit(".", 1)[-1] if "." in name else ""


def file_format(path: str) -> str | None:
    """``parquet`` / ``jsonl`` / ``txt`` from the file name (compression suffix ignored), else None."""
    name = path.rsplit("/", 1)[-1].lower()
    for comp in _COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    return None


def check_protocol(url: str) -> None:
    """Refuse fsspec protocols outside ``ALLOWED_PROTOCOLS`` (chained URLs: every link)."""
    for part in url.split("::"):
        proto = part.split("://", 1)[0] if "://" in part else part
        if proto.lower() not in ALLOWED_PROTOCOLS:
            raise SourceError(
                f"{url}: fsspec protocol {proto!r} is not allowed; use one of "
                f"{', '.join(sorted(ALLOWED_PROTOCOLS))} (or a local path)"
            )


def _expand(spec: str, fs, path: str) -> list[str]:
    """Sorted supported files of a path, glob or directory on ``fs``."""
    if any(c in path for c in _GLOB_CHARS):
        found = fs.glob(path)
        if not found:
            raise SourceError(f"{spec}: no files match the glob; check the pattern")
    elif fs.isdir(path):
        found = fs.find(path)
    elif fs.exists(path):
        found = [path]
    else:
        raise SourceError(f"{spec}: no such file or directory")
    files, other = [], []
    for p in sorted(found):
        if fs.isdir(p):
            continue
        (files if file_format(p) else other).append(p)
    if not files:
        raise SourceError(
            f"{spec}: no parquet / jsonl(.gz|.zst) / txt files"
            + (f" (found e.g. {other[0]})" if other else "") + "; point at supported files"
        )
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto not in ("file", "local"):
        files = [f"{proto}://{p}" if "://" not in p else p for p in files]
    return files


def open_source(
    spec: str,
    *,
    text_field: str = "text",
    filters: list[str] | None = None,
    txt_per_line: bool = False,
    hf_config: str | None = None,
    hf_split: str = "train",
    data_files: str | list[str] | None = None,
) -> Source:
    """Resolve ``spec`` (see the module doc) into a :class:`Source`."""
    import os

    import fsspec

    parsed = [RowFilter.parse(f) for f in (filters or [])]
    columns = list(dict.fromkeys([text_field] + [f.field for f in parsed]))
    if spec.startswith("builtin:"):
        return BuiltinSource(spec.split(":", 1)[1])
    if spec in PRESETS:
        path, name = PRESETS[spec]
        return HFDatasetSource(path, hf_config or name, hf_split, spec=spec, columns=columns)
    if spec.startswith("datasets:"):
        return HFDatasetSource(spec.split(":", 1)[1], hf_config, hf_split, data_files=data_files,
                               spec=spec, columns=columns)
    if "://" in spec or "::" in spec:
        check_protocol(spec)
        if spec.startswith("file://"):
            spec_path = spec[len("file://"):]
            fs = fsspec.filesystem("file")
            return FileSource(spec, _expand(spec, fs, spec_path), fs, columns, txt_per_line)
        fs, path = fsspec.core.url_to_fs(spec)
        return FileSource(spec, _expand(spec, fs, path), fs, columns, txt_per_line)
    local_exists = os.path.exists(spec) or any(c in spec for c in _GLOB_CHARS)
    if not local_exists and _HUB_ID.match(spec) and file_format(spec) is None:
        return HFDatasetSource(spec, hf_config, hf_split, spec=spec, columns=columns)
    fs = fsspec.filesystem("file")
    return FileSource(spec, _expand(spec, fs, os.path.abspath(spec)), fs, columns, txt_per_line)
