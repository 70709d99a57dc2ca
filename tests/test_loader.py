"""DistributedTokenLoader: rank disjointness, exact resume, world-size-independent stream, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.loader import DistributedTokenLoader
from data_pipeline.shards import ShardError, write_shard

T = 8


@pytest.fixture()
def data_dir(tmp_path):
    # Unequal shard sizes; each token is its global index (mod 65536) so rows identify themselves.
    sizes = [8 * 13 + 1, 8 * 7 + 5, 8 * 10 + 1]
    off = 0
    for i, n in enumerate(sizes):
        write_shard(tmp_path / f"train_{i:06d}.bin", (np.arange(off, off + n) % 65536))
        off += n
    write_shard(tmp_path / "val_000000.bin", np.arange(8 * 6 + 1) + 40000)
    return tmp_path


def make(d, **kw):
    args = dict(seq_len=T, micro_batch_size=2, global_batch_seqs=4, seed=3, shuffle=True)
    args.update(kw)
    return DistributedTokenLoader(d, "train", **args)


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_shapes_and_shift(data_dir):
    ld = make(data_dir)
    x, y = ld.next_batch()
    assert x.shape == y.shape == (2, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive ids: a row never straddles shards


def test_epoch_covers_every_sequence_once(data_dir):
    ld = make(data_dir, global_batch_seqs=2)
    n = ld.num_sequences
    assert n == 13 + 7 + 10
    rows = torch.cat([x for x, _ in take(ld, n // 2)])
    firsts = sorted(rows[:, 0].tolist())
    assert len(set(firsts)) == n
    unshuffled = make(data_dir, global_batch_seqs=2, shuffle=False)
    assert sorted(torch.cat([x for x, _ in take(unshuffled, n // 2)])[:, 0].tolist()) == firsts
    # Next epoch is a different permutation of the same sequences.
    rows2 = torch.cat([x for x, _ in take(ld, n // 2)])
    assert sorted(rows2[:, 0].tolist()) == firsts and not torch.equal(rows, rows2)


def test_ranks_disjoint_and_cover_global_batch(data_dir):
    single = make(data_dir, micro_batch_size=4, global_batch_seqs=4)
    r0 = make(data_dir, rank=0, world_size=2)
    r1 = make(data_dir, rank=1, world_size=2)
    for _ in range(10):
        xs, _ = single.next_batch()
        a, _ = r0.next_batch()
        b, _ = r1.next_batch()
        assert torch.equal(torch.cat([a, b]), xs)
        assert not set(a[:, 0].tolist()) & set(b[:, 0].tolist())


def test_resume_mid_shard_and_across_boundaries(data_dir):
    ref = take(make(data_dir), 40)  # > 2 epochs of 30 sequences
    for cut in (1, 3, 7, 15, 16, 29):
        ld = make(data_dir)
        take(ld, cut)
        state = ld.state_dict()
        fresh = make(data_dir)
        fresh.load_state_dict(state)
        for (x, y), (rx, ry) in zip(take(fresh, 40 - cut), ref[cut:]):
            assert torch.equal(x, rx) and torch.equal(y, ry)


def test_resume_world_size_2_from_world_size_1(data_dir):
    single = make(data_dir, micro_batch_size=2, global_batch_seqs=4)  # 2 micro-steps per step
    take(single, 6)  # 3 steps
    state = single.state_dict()
    ref = make(data_dir, micro_batch_size=4, global_batch_seqs=4)
    take(ref, 3)
    r0 = make(data_dir, rank=0, world_size=2)
    r1 = make(data_dir, rank=1, world_size=2)
    r0.load_state_dict(state)
    r1.load_state_dict(state)
    for _ in range(8):
        xs, _ = ref.next_batch()
        assert torch.equal(torch.cat([r0.next_batch()[0], r1.next_batch()[0]]), xs)
    assert r0.state_dict() == r1.state_dict()
    mid = make(data_dir)
    take(mid, 1)
    with pytest.raises(ValueError, match="step boundary"):
        make(data_dir, rank=0, world_size=2).load_state_dict(mid.state_dict())


def test_state_mismatch_rejected(data_dir):
    state = make(data_dir).state_dict()
    with pytest.raises(ValueError, match="'seed'"):
        make(data_dir, seed=4).load_state_dict(state)


def test_seed_determinism(data_dir):
    a = take(make(data_dir, seed=1), 5)
    b = take(make(data_dir, seed=1), 5)
    c = take(make(data_dir, seed=2), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_val_prefix_is_fixed(data_dir):
    def prefix():
        ld = DistributedTokenLoader(data_dir, "val", T, 2, 2, shuffle=False)
        return take(ld, 3)

    a, b = prefix(), prefix()
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert a[0][0][0, 0].item() == 40000


def test_short_shard_and_split_errors(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.arange(100))
    write_shard(tmp_path / "train_000001.bin", np.arange(10))
    with pytest.raises(ShardError, match="train_000001.bin.*fewer than one micro-batch"):
        make(tmp_path)
    (tmp_path / "train_000001.bin").unlink()
    with pytest.raises(ShardError, match="fewer than one global batch"):
        make(tmp_path, global_batch_seqs=16)


def test_bad_batch_args(data_dir):
    with pytest.raises(ValueError, match="not divisible"):
        make(data_dir, micro_batch_size=3, global_batch_seqs=4)


def test_reads_shards_written_by_llmc_code(tmp_path):
    """Shards written with plain numpy header code, as llm.c's data_common.write_datafile does."""
    rng = np.random.default_rng(0)
    streams = {}
    for name in ["val_000000.bin", "train_000000.bin", "train_000001.bin"]:
        toks = rng.integers(0, 50257, size=8 * 20 + 1).tolist()
        header = np.zeros(256, dtype=np.int32)
        header[0], header[1], header[2] = 20240520, 1, len(toks)
        with open(tmp_path / name, "wb") as f:
            f.write(header.tobytes())
            f.write(np.array(toks, dtype=np.uint16).tobytes())
        streams[name] = np.array(toks)
    ld = DistributedTokenLoader(tmp_path, "train", T, 4, 4, shuffle=False)
    got = torch.cat([x for x, _ in take(ld, 10)]).numpy()
    expect = np.concatenate([streams[n][: 20 * T].reshape(20, T) for n in ["train_000000.bin", "train_000001.bin"]])
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("damage, match", [
    (lambda b: b"\x00\x00\x00\x00" + b[4:], "bad magic"),
    (lambda b: b[:4] + b"\x02\x00\x00\x00" + b[8:], "version 2"),
    (lambda b: b[:100], "truncated"),
    (lambda b: b[:-10], "header says"),
])
def test_corrupt_shard_errors_name_the_file(data_dir, damage, match):
    bad = data_dir / "train_000001.bin"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(ShardError, match=match) as e:
        make(data_dir)
    assert str(bad) in str(e.value)


@pytest.mark.gpu
def test_cuda_batches_match_cpu(data_dir):
    cpu = take(make(data_dir), 5)
    gpu = take(make(data_dir, device="cuda"), 5)
    for (x, y), (gx, gy) in zip(cpu, gpu):
        assert gx.is_cuda and torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)
