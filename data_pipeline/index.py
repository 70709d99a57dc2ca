"""``gpt2-prepare --index DIR``: a manifest for token shards another tool made, so the trainer uses them.

llm.c's ``dev/data/fineweb.py`` and modded-nanogpt's cached FineWeb shards are written in the
format this project reads (``data_pipeline.shards``: a 256 x int32 header, magic 20240520,
version 1, the token count, then uint16 tokens), as ``<name>_val_000000.bin`` and
``<name>_train_NNNNNN.bin``. Without a manifest the loader cannot verify them, and a remote
``data.dir`` cannot be used at all. ``--index`` checks every ``*.bin`` file in DIR --

* its header and size (a truncated download or another format is refused, naming the file),
* its token range: every id below GPT-2's vocabulary (50257); one beyond it means other tokens,
* its sha256 and largest id, and its documents (the EOT count: llm.c starts each document with one)

-- all before writing anything, then writes ``manifest.json``: the validation shards (the files
matching ``--val-glob``, llm.c's ``*_val_*`` by default), then the rest as training shards, in
name order, ``complete: true``. Rerunning it re-indexes (same files: the same manifest); a
directory prepared by ``gpt2-prepare`` itself is refused (``--verify`` checks that one).
"""

from __future__ import annotations

import fnmatch
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from data_pipeline import integrity
from data_pipeline import tokenizer as tok
from data_pipeline.job import MANIFEST_VERSION, PrepareError, check_out_dir, tokenizer_info
from data_pipeline.manifest import read_manifest
from data_pipeline.shards import HEADER_BYTES, TOKEN_DTYPE, is_url, local_path, read_header, read_shard
from data_pipeline.store import token_range_error


class _Scan:
    """``on_chunk`` of one read: the largest token id and the EOT count of a shard."""

    def __init__(self) -> None:
        self.max, self.eot = -1, 0

    def __call__(self, offset: int, data: bytes) -> None:
        skip = max(HEADER_BYTES - offset, 0)
        if skip < len(data):
            t = np.frombuffer(data, dtype=TOKEN_DTYPE, offset=skip)
            if t.size:
                self.max = max(self.max, int(t.max()))
                self.eot += int(np.count_nonzero(t == tok.EOT_ID))


def _scan(path: Path) -> tuple[str, int, int]:
    """(sha256, max token id, EOT count) of the shard at ``path``, in one read."""
    scan = _Scan()
    digest, _ = integrity.sha256_file(path, on_chunk=scan)
    return digest, scan.max, scan.eot


def index(data_dir: str, val_glob: str = "*_val_*", workers: int | None = None) -> dict:
    """Check and index the llm.c shards in ``data_dir`` (see the module doc); returns the manifest."""
    d = local_path(data_dir)
    if is_url(data_dir) or not d.is_dir():
        raise PrepareError(f"{data_dir}: not a local directory; --index reads the shards on this machine (index "
                           "them before uploading them)")
    old = read_manifest(d)
    if old is not None and not (old.get("settings") or {}).get("index"):
        raise PrepareError(f"{d / 'manifest.json'}: already the manifest of a gpt2-prepare run; check it with "
                           f"gpt2-prepare --verify {d} instead")
    files = sorted(p for p in d.glob("*.bin") if p.is_file())
    val = [p for p in files if fnmatch.fnmatch(p.name, val_glob)]
    train = [p for p in files if p not in val]
    if not val or not train:
        raise PrepareError(
            f"{d}: {len(files)} .bin files, {len(val)} matching --val-glob {val_glob!r} (validation) and "
            f"{len(train)} not (training); both are needed: name the validation shards with --val-glob")
    check_out_dir(str(d))
    tokens = [read_header(p, fix="not a complete llm.c shard: download or write it again") for p in val + train]
    with ThreadPoolExecutor(min(workers or os.cpu_count() or 1, 8, len(files))) as pool:
        scans = list(pool.map(_scan, val + train))
    for p, (_, top, _) in zip(val + train, scans):
        if top >= tok.VOCAB_SIZE:
            raise PrepareError(str(token_range_error(p, read_shard(p), tok.VOCAB_SIZE)).split(" (ids in")[0]
                               + "; these are not GPT-2 tokens: index shards made with the GPT-2 tokenizer")
    shards = [{"file": p.name, "split": "val" if p in val else "train", "tokens": n, "documents": eot,
               "sha256": digest, "max_token_id": top}
              for p, n, (digest, top, eot) in zip(val + train, tokens, scans)]
    for split in ("val", "train"):  # llm.c writes what is left into the last shard of each split
        [s for s in shards if s["split"] == split][-1]["final"] = True
    n_val = sum(s["tokens"] for s in shards if s["split"] == "val")
    total = sum(s["tokens"] for s in shards)
    manifest = {"version": MANIFEST_VERSION,
                "format": "llm.c token shards: 256 x int32 header (20240520, 1, n) + n x uint16",
                "complete": True, "source": {"kind": "index", "files": len(files)}, "tokenizer": tokenizer_info(),
                "settings": {"index": True, "val_glob": val_glob}, "shards": shards,
                "totals": {"tokens": total, "val_tokens": n_val, "train_tokens": total - n_val,
                           "documents": sum(s["documents"] for s in shards),
                           "val_shards": len(val), "train_shards": len(train)}}
    from data_pipeline.shards import write_manifest

    write_manifest(d, manifest)
    print(f"prepare: indexed {len(files)} shards in {d} ({n_val:,} val + {total - n_val:,} train tokens, "
          f"{manifest['totals']['documents']:,} documents) into {d / 'manifest.json'}")
    return manifest
