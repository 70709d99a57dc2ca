"""The shard format: llm.c compatibility, validation errors that name the file, the manifest."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.manifest import list_shards, read_manifest
from data_pipeline.shards import (
    HEADER_BYTES,
    MAGIC,
    ShardError,
    read_header,
    read_shard,
    write_manifest,
    write_shard,
)


def llmc_write_datafile(filename, toks):
    """llm.c's dev/data/data_common.py::write_datafile (GPT-2 branch), verbatim in spirit."""
    assert len(toks) < 2**31
    header = np.zeros(256, dtype=np.int32)
    header[0] = 20240520
    header[1] = 1
    header[2] = len(toks)
    toks_np = np.array(toks, dtype=np.uint16)
    with open(filename, "wb") as f:
        f.write(header.tobytes())
        f.write(toks_np.tobytes())


def test_roundtrip_and_llmc_bytes(tmp_path):
    toks = np.random.default_rng(0).integers(0, 50257, size=1000)
    sha = write_shard(tmp_path / "train_000000.bin", toks)
    llmc_write_datafile(tmp_path / "ref.bin", toks.tolist())
    assert (tmp_path / "train_000000.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()
    mm = read_shard(tmp_path / "ref.bin")
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint16
    np.testing.assert_array_equal(mm, toks)
    import hashlib

    assert sha == hashlib.sha256((tmp_path / "ref.bin").read_bytes()).hexdigest()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_rejects_ids_over_uint16(tmp_path):
    with pytest.raises(ShardError, match="uint16"):
        write_shard(tmp_path / "x.bin", np.array([1, 70000]))
    assert not (tmp_path / "x.bin").exists()


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda b: (np.int32(123).tobytes() + b[4:]), "bad magic"),
        (lambda b: (b[:4] + np.int32(7).tobytes() + b[8:]), "version 7"),
        (lambda b: b[:500], "truncated"),
        (lambda b: b[:-2], "header says 100 tokens"),
        (lambda b: b + b"\0\0", "header says 100 tokens"),
    ],
)
def test_corrupt_shards_name_the_file(tmp_path, corrupt, match):
    good = tmp_path / "good.bin"
    write_shard(good, np.arange(100))
    bad = tmp_path / "val_000000.bin"
    bad.write_bytes(corrupt(good.read_bytes()))
    with pytest.raises(ShardError, match=match) as e:
        read_shard(bad)
    assert str(bad) in str(e.value)


def test_header_constants(tmp_path):
    write_shard(tmp_path / "a.bin", [5, 6, 7])
    raw = (tmp_path / "a.bin").read_bytes()
    assert len(raw) == HEADER_BYTES + 6
    assert np.frombuffer(raw[:12], dtype="<i4").tolist() == [MAGIC, 1, 3]
    assert read_header(tmp_path / "a.bin") == 3


def test_list_shards_manifest_order_and_glob(tmp_path):
    for name in ["train_000001.bin", "train_000000.bin", "val_000000.bin"]:
        write_shard(tmp_path / name, [1, 2, 3])
    assert [p.name for p in list_shards(tmp_path, "train")] == ["train_000000.bin", "train_000001.bin"]
    write_manifest(tmp_path, {"shards": [{"file": "train_000001.bin", "split": "train"},
                                         {"file": "train_000000.bin", "split": "train"}]})
    assert read_manifest(tmp_path)["shards"][0]["file"] == "train_000001.bin"
    assert [p.name for p in list_shards(tmp_path, "train")] == ["train_000001.bin", "train_000000.bin"]
    with pytest.raises(ShardError, match="no 'val' shards"):
        list_shards(tmp_path, "val")
    with pytest.raises(ShardError, match="not found"):
        list_shards(tmp_path / "nope", "train")


@pytest.mark.parametrize("evil", ["../outside/train_000000.bin", "ABS", "sub/train_000000.bin", ".."])
def test_manifest_entries_must_stay_in_the_directory(tmp_path, evil):
    data = tmp_path / "data"
    write_shard(data / "train_000000.bin", [1, 2, 3])
    write_shard(tmp_path / "outside" / "train_000000.bin", [1, 2, 3])
    if evil == "ABS":
        evil = str(tmp_path / "outside" / "train_000000.bin")
    write_manifest(data, {"shards": [{"file": evil, "split": "train"}]})
    with pytest.raises(ShardError, match="points outside"):
        list_shards(data, "train")
