"""Validation loss: a fixed slice of the val shards, token-weighted, the same every time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.shards import write_shard
from evals.val_loss import ValLossEvaluator
from pretrain.model import GPT, GPTConfig

T = 16


def make_val_data(root, sizes=(4 * T + 5, 7 * T + 1), vocab=512, seed=0):
    """Val shards of the given token counts (+ a train shard that must never be read)."""
    rng = np.random.default_rng(seed)
    shards = []
    for i, n in enumerate(sizes):
        toks = rng.integers(0, vocab, size=n)
        write_shard(root / f"val_{i:06d}.bin", toks)
        shards.append(toks)
    write_shard(root / "train_000000.bin", rng.integers(0, vocab, size=10 * T))
    return shards


def expected_sequences(shards, n):
    """The loader's layout: sequence i of a shard = tokens[i*T : i*T + T + 1], shard by shard."""
    seqs = [s[i * T: i * T + T + 1] for s in shards for i in range((len(s) - 1) // T)]
    return torch.tensor(np.stack(seqs[:n]), dtype=torch.long)


def small_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset("tiny-vocab", block_size=T)).eval()


def test_val_loss_is_token_weighted_mean_over_fixed_slice(tmp_path):
    shards = make_val_data(tmp_path)
    model = small_model()
    # 9 sequences: all 4 of shard 0 and 5 of shard 1; batches of 4 -> the last one is padded
    ev = ValLossEvaluator(tmp_path, seq_len=T, batch_size=4, num_tokens=9 * T, rank=0, world_size=1, device="cpu")
    out = ev(model, step=10)
    seqs = expected_sequences(shards, 9)
    with torch.no_grad():
        logits, _ = model(seqs[:, :-1])
        want = F.cross_entropy(logits.reshape(-1, logits.size(-1)), seqs[:, 1:].reshape(-1)).item()
    assert out["val/tokens"] == 9 * T
    assert out["val/loss"] == pytest.approx(want, rel=1e-6)
    assert out["val/ppl"] == pytest.approx(np.exp(want), rel=1e-6)
    assert ev(model, step=20) == out  # the same tokens every time
    # rank shares: disjoint, together the whole slice, and the same number of batches on each
    shares = [ValLossEvaluator(tmp_path, T, 4, 9 * T, rank=r, world_size=2) for r in range(2)]
    assert sorted(shares[0].mine + shares[1].mine) == sorted(ev.mine)
    assert shares[0].num_batches == shares[1].num_batches == 2


def test_a_batch_larger_than_the_slice_allocates_only_the_slice(tmp_path):
    """--batch-size 99999999999 asked numpy for (99999999999, T+1) int64 (47 TiB, a traceback):
    rows past a rank's share are padding, so the batch is the share at most, the loss the same."""
    make_val_data(tmp_path)
    model = small_model()
    small = ValLossEvaluator(tmp_path, seq_len=T, batch_size=9, num_tokens=9 * T, rank=0, world_size=1)
    huge = ValLossEvaluator(tmp_path, seq_len=T, batch_size=99_999_999_999, num_tokens=9 * T, rank=0, world_size=1)
    assert (huge.batch_size, huge.num_batches) == (9, 1)
    assert huge(model, step=1) == small(model, step=1)


def test_restores_mode_and_whole_split(tmp_path):
    make_val_data(tmp_path)
    model = small_model().train()
    ev = ValLossEvaluator(tmp_path, T, 3, None, 0, 1, "cpu")
    out = ev(model, 0)
    assert model.training and out["val/tokens"] == 11 * T  # 4 + 7 sequences


def test_errors_name_the_problem(tmp_path):
    make_val_data(tmp_path)
    with pytest.raises(ValueError, match=r"hold 11 sequences of 16 tokens .* lower eval.val_tokens"):
        ValLossEvaluator(tmp_path, T, 4, 12 * T, 0, 1, "cpu")
    with pytest.raises(ValueError, match="less than one sequence"):
        ValLossEvaluator(tmp_path, T, 4, T - 1, 0, 1, "cpu")
    with pytest.raises(ValueError, match="data directory not found"):
        ValLossEvaluator(tmp_path / "missing", T, 4, 4 * T, 0, 1, "cpu")


def test_bits_per_byte_against_decoded_bytes(tmp_path):
    """val/bpb = nats of the text tokens / ln 2 / their UTF-8 bytes, computed here independently:
    full logits, and the bytes of the decoded token stream (text with characters that GPT-2 splits
    across tokens, and <|endoftext|> separators, which count neither bytes nor nats)."""
    import math

    from data_pipeline.tokenizer import EOT_ID, gpt2_encoding

    enc = gpt2_encoding()
    docs = ["Grüße aus Köln — 東京タワー 🦙🦙 naïve café", "plain ascii text, then ∑ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 letters."]
    toks = []
    while len(toks) < 5 * T + 1:
        for d in docs:
            toks += enc.encode_ordinary(d) + [EOT_ID]
    split = [t for t in toks if len(enc.decode_single_token_bytes(t).decode("utf-8", errors="ignore")) == 0]
    assert split, "the fixture must hold tokens that are part of a multi-byte character"
    write_shard(tmp_path / "val_000000.bin", np.array(toks[:5 * T + 1]))
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", block_size=T)).eval()
    out = ValLossEvaluator(tmp_path, T, 2, 5 * T, 0, 1, "cpu")(model, 0)
    seqs = torch.tensor([toks[i * T:i * T + T + 1] for i in range(5)])
    with torch.no_grad():
        logits, _ = model(seqs[:, :-1])
    nats = F.cross_entropy(logits.reshape(-1, logits.size(-1)), seqs[:, 1:].reshape(-1), reduction="none")
    targets = seqs[:, 1:].reshape(-1)
    text = targets != EOT_ID
    nbytes = len(enc.decode_bytes([t for t in targets.tolist() if t != EOT_ID]))
    want = nats[text].double().sum().item() / math.log(2) / nbytes
    assert out["val/bpb"] == pytest.approx(want, rel=1e-6)
    assert out["val/loss"] == pytest.approx(nats.double().mean().item(), rel=1e-6)
