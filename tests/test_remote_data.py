"""Shards that live elsewhere: data.dir as an fsspec URL (memory://, file:// standing for s3:// and
friends). Each shard is copied into data.cache_dir, verified against the manifest's sha256 before
use, fetched one shard ahead of the one being read, fetched again once when a copy is bad, then
refused in one line. The run plan reads only the manifest and one listing."""

from __future__ import annotations

import json
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from helpers import make_synthetic_shards, tiny_overrides

from data_pipeline import store as store_mod
from data_pipeline.loader import DistributedTokenLoader
from data_pipeline.shards import HEADER_BYTES, ShardError, file_sha256, read_shard, write_manifest

SETTINGS = {"source": "synthetic:toy", "text_field": "text", "filters": [], "txt_per_line": False,
            "hf_config": None, "hf_split": "train", "data_files": None, "shard_tokens": 6000,
            "val_tokens": 4000, "max_tokens": None}


def prepared(d: Path, n_train_shards: int = 2) -> Path:
    """Synthetic shards (ids < 512) with a prepare-style manifest."""
    make_synthetic_shards(d, n_train_shards=n_train_shards)
    shards = []
    for p in sorted(d.glob("val_*.bin")) + sorted(d.glob("train_*.bin")):
        t = np.asarray(read_shard(p))
        shards.append({"file": p.name, "split": p.name.split("_")[0], "tokens": int(t.size), "documents": 1,
                       "sha256": file_sha256(p), "max_token_id": int(t.max())})
    write_manifest(d, {"version": 1, "complete": True, "settings": SETTINGS, "shards": shards})
    return d


@pytest.fixture(params=["memory", "file"])
def remote(request, tmp_path):
    """(url, a function that returns the fs path of a file at the URL): the prepared data uploaded."""
    local = prepared(tmp_path / "made")
    if request.param == "memory":
        fs = fsspec.filesystem("memory")
        root = f"/{tmp_path.name}/data"
        fs.put(str(local), root, recursive=True)
        yield f"memory://{root}", fs, root
        fs.rm(root, recursive=True)
    else:
        bucket = tmp_path / "bucket"
        local.rename(bucket)
        yield f"file://{bucket}", fsspec.filesystem("file"), str(bucket)


def flip(fs, path: str, offset: int = HEADER_BYTES + 100) -> None:
    data = bytearray(fs.cat_file(path))
    data[offset] ^= 0x5A
    fs.pipe_file(path, bytes(data))


def cached(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*.bin"))


def test_plan_reads_the_manifest_and_a_listing_only_then_training_copies_and_verifies(remote, tmp_path, capsys):
    from pretrain.config import load_config
    from pretrain.plan import make_plan
    from pretrain.train import main

    url, fs, root = remote
    cache = tmp_path / "cache"
    over = tiny_overrides(url, tmp_path / "run", **{"data.cache_dir": str(cache), "eval.interval": 4,
                                                     "eval.val_tokens": 256, "schedule.max_steps": 4})
    plan = make_plan(load_config(None, over), 1)
    assert plan.train_tokens == 24_000
    assert cached(cache) == [] and len(list(cache.rglob("manifest.json"))) == 1  # nothing fetched before step 1
    assert main(over) == 0
    assert cached(cache) == ["train_000000.bin", "train_000001.bin", "val_000000.bin"]
    for p in cache.rglob("*.bin"):
        assert p.read_bytes() == fs.cat_file(f"{root}/{p.name}")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4] and any("val/loss" in r for r in rows)
    capsys.readouterr()


def test_training_on_a_url_matches_training_on_the_local_copy(tmp_path):
    from pretrain.train import main

    local = prepared(tmp_path / "made")
    fs = fsspec.filesystem("memory")
    root = f"/{tmp_path.name}/same"
    fs.put(str(local), root, recursive=True)
    try:
        assert main(tiny_overrides(local, tmp_path / "a", **{"schedule.max_steps": 3})) == 0
        assert main(tiny_overrides(f"memory://{root}", tmp_path / "b", **{"schedule.max_steps": 3,
                                                                          "data.cache_dir": str(tmp_path / "c")})) == 0
    finally:
        fs.rm(root, recursive=True)
    loss = [[json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab"]
    assert loss[0] == loss[1]


def test_a_bad_cached_copy_is_fetched_again_and_training_goes_on(remote, tmp_path, monkeypatch):
    from pretrain.train import main

    url, fs, root = remote
    cache = tmp_path / "cache"
    over = {"data.cache_dir": str(cache), "schedule.max_steps": 2, "checkpoint.interval": 2}
    assert main(tiny_overrides(url, tmp_path / "run", **over)) == 0
    copy = next(cache.rglob("train_000001.bin"))
    with open(copy, "r+b") as f:
        f.seek(HEADER_BYTES + 10)
        f.write(b"\x00\x01")
    fetched = []
    real = store_mod._atomic_copy
    monkeypatch.setattr(store_mod, "_atomic_copy", lambda dest, *a: fetched.append(dest.name) or real(dest, *a))
    assert main(tiny_overrides(url, tmp_path / "run", **{**over, "schedule.max_steps": 8})) == 0
    # the manifest once (the plan's; the loader is built on the split the plan checked); one shard refetched
    assert fetched == ["manifest.json", "train_000001.bin"]
    assert copy.read_bytes() == fs.cat_file(f"{root}/train_000001.bin")


def test_a_corrupt_remote_shard_is_fetched_twice_then_refused_in_one_line(remote, tmp_path, monkeypatch, capsys):
    from pretrain.train import main

    url, fs, root = remote
    flip(fs, f"{root}/train_000000.bin")
    fetched = []
    real = store_mod._atomic_copy
    monkeypatch.setattr(store_mod, "_atomic_copy", lambda dest, *a: fetched.append(dest.name) or real(dest, *a))
    capsys.readouterr()
    rc = main(tiny_overrides(url, tmp_path / "run", **{"data.cache_dir": str(tmp_path / "cache"),
                                                       "data.shuffle": "false"}))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"{url}/train_000000.bin: fetched twice" in err[0] and "neither copy matches" in err[0]
    assert "upload it again" in err[0] and "Traceback" not in err[0]
    assert fetched.count("train_000000.bin") == 2


def test_the_plan_refuses_a_short_remote_shard_from_the_listing(remote, tmp_path):
    from pretrain.config import ConfigError, load_config
    from pretrain.plan import make_plan

    url, fs, root = remote
    fs.pipe_file(f"{root}/train_000001.bin", fs.cat_file(f"{root}/train_000001.bin")[:-6])
    with pytest.raises(ConfigError, match=r"train_000001.bin: 25018 bytes, but manifest.json says 12000 tokens"):
        make_plan(load_config(None, tiny_overrides(url, tmp_path / "run",
                                                   **{"data.cache_dir": str(tmp_path / "cache")})), 1)
    assert cached(tmp_path / "cache") == []


def test_the_loader_fetches_one_shard_ahead_of_the_one_it_reads(tmp_path):
    local = prepared(tmp_path / "made", n_train_shards=4)
    fs = fsspec.filesystem("memory")
    root = f"/{tmp_path.name}/ahead"
    fs.put(str(local), root, recursive=True)
    try:
        ld = DistributedTokenLoader(f"memory://{root}", "train", seq_len=32, micro_batch_size=4, global_batch_seqs=4,
                                    shuffle=False, cache_dir=tmp_path / "cache", vocab_size=512)
        cache = ld.data_dir
        ld.next_batch()  # shard 0 fetched and verified; shard 1 follows in the background, no further
        deadline = time.time() + 30
        while "train_000001.bin" not in cached(cache) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        assert cached(cache) == ["train_000000.bin", "train_000001.bin"]
        for _ in range(int(ld.shard_seqs[0]) // 4 + 1):  # into shard 1: shard 2 is fetched next
            ld.next_batch()
        deadline = time.time() + 30
        while "train_000002.bin" not in cached(cache) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        assert cached(cache) == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
        ld.close()
    finally:
        fs.rm(root, recursive=True)


def test_a_remote_dir_without_a_manifest_or_cache_dir_is_refused(tmp_path):
    from pretrain.config import ConfigError, load_config

    fs = fsspec.filesystem("memory")
    root = f"/{tmp_path.name}/bare"
    fs.pipe_file(f"{root}/train_000000.bin", b"x")
    try:
        with pytest.raises(ShardError, match="manifest.json: not found; a remote data.dir needs"):
            DistributedTokenLoader(f"memory://{root}", "train", 32, 2, 2, cache_dir=tmp_path)
        with pytest.raises(ShardError, match="set one"):
            DistributedTokenLoader(f"memory://{root}", "train", 32, 2, 2)
        with pytest.raises(ConfigError, match="data.cache_dir"):
            load_config(None, tiny_overrides(f"memory://{root}", tmp_path / "run"))
        with pytest.raises(ShardError, match="protocol 'ftp' is not allowed"):
            DistributedTokenLoader("ftp://host/data", "train", 32, 2, 2, cache_dir=tmp_path)
    finally:
        fs.rm(root, recursive=True)


def test_a_full_cache_disk_is_one_line_naming_the_cache(remote, tmp_path, monkeypatch):
    """ENOSPC while a shard is copied into data.cache_dir: a ShardError naming the cache and the
    knob (the trainer's one line, exit 2), not an OSError traceback."""
    import errno

    import data_pipeline.store as store

    url, _, _ = remote
    s = store.ShardStore(url, cache_dir=tmp_path / "cache")

    def full(dest, chunks, stop=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(dest))

    monkeypatch.setattr(store, "_atomic_copy", full)
    with pytest.raises(ShardError, match=r"cannot copy train_000000.bin into the shard cache \(No space left on "
                                         r"device\); free space there or set data.cache_dir"):
        s._fetch("train_000000.bin")
