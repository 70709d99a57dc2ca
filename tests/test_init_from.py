"""model.init_from: start a run from a Hugging Face GPT-2 directory, a hub name or a native
checkpoint (pretrain/training/init_from.py), through the real trainer.

The parity test saves a *random* ``transformers`` GPT-2 (every parameter perturbed, so biases,
LayerNorms and the Conv1D transposes all matter) and checks that the trainer's first step, on
its first batch, reports the loss ``transformers`` computes on that batch.

Run as a module under torchrun (``python -m torch.distributed.run --nproc_per_node=2
-m tests.test_init_from SRC_DIR``), it checks loading into an FSDP2-sharded model against
loading before sharding.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    assert_params_equal,
    final_params,
    free_port,
    losses,
    make_synthetic_shards,
    memo,
    python_cmd,
    run,
    shared_data,
    tiny_overrides,
    torchrun_cmd,
)

transformers = pytest.importorskip("transformers")

STEPS = 4


def save_random_hf(out: Path, n_positions: int = 64, vocab: int = 512, seed: int = 0, **kw) -> Path:
    """A random GPT2LMHeadModel (no download) saved as model.safetensors + config.json."""
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return save_random_hf(tmp_path_factory.mktemp("hf") / "gpt2-random")


def build(overrides: list[str]):
    from pretrain.config import load_config
    from pretrain.plan import make_plan
    from pretrain.training.build import build_trainer

    cfg = load_config(None, overrides)
    return build_trainer(make_plan(cfg, 1))


def finish(trainer) -> None:
    trainer.logger.close()
    trainer.close()


def test_first_step_loss_equals_transformers(tmp_path, hf_dir, capsys):
    data = make_synthetic_shards(tmp_path / "data")
    trainer = build(tiny_overrides(data, tmp_path / "run", **{"model.init_from": str(hf_dir),
                                                              "model.block_size": 64}))
    try:
        assert "model.init_from: weights of" in capsys.readouterr().out
        loader_state = trainer.loader.state_dict()
        batches = [trainer.loader.next_batch() for _ in range(trainer.plan.batch.grad_accum_steps)]
        trainer.loader.load_state_dict(loader_state)
        result = trainer.train_step()
    finally:
        finish(trainer)
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        # transformers shifts labels itself: give it the T+1 tokens x[0], ..., x[T-1], y[T-1].
        ref = [hf(torch.cat([x, y[:, -1:]], 1), labels=torch.cat([x, y[:, -1:]], 1)).loss for x, y in batches]
    expected = torch.stack(ref).mean().item()
    assert result.loss == pytest.approx(expected, abs=1e-5)


def test_resume_ignores_init_from(tmp_path, hf_dir, capsys):
    data = make_synthetic_shards(tmp_path / "data")
    run_dir = tmp_path / "run"
    first = build(tiny_overrides(data, run_dir, **{"model.init_from": str(hf_dir), "model.block_size": 64,
                                                   "schedule.max_steps": STEPS}))
    try:
        first.train()
    finally:
        finish(first)
    ckpt = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    capsys.readouterr()
    # A source that does not exist: a fresh start refuses it, a resumed run never reads it.
    missing = str(tmp_path / "no-such-model")
    resumed = build(tiny_overrides(data, run_dir, **{"model.init_from": missing, "model.block_size": 64}))
    try:
        out = capsys.readouterr().out
        assert f"model.init_from={missing} ignored: resuming checkpoint {ckpt} (the checkpoint wins)" in out
        assert resumed.step == STEPS
        assert_params_equal(resumed.model.state_dict(), final_params(run_dir, STEPS))
    finally:
        finish(resumed)
    # The saved config records init_from; the checkpoint still loads as a model (evals, export).
    from pretrain.model.weights import load_model

    assert load_model(ckpt).config.block_size == 64

    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.init_from='.*no-such-model': .* does not exist"):
        build(tiny_overrides(data, tmp_path / "fresh", **{"model.init_from": missing}))


def test_mismatched_architecture_is_one_line_exit_2(tmp_path, hf_dir):
    data = make_synthetic_shards(tmp_path / "data", train_tokens=4000)
    p = run(python_cmd(tiny_overrides(data, tmp_path / "run", **{
        "model.init_from": str(hf_dir), "model.n_embd": 64, "model.n_layer": 3, "model.block_size": 128})),
        check=False)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "model.n_layer=3 (the source has 2)" in err and "model.n_embd=64 (the source has 32)" in err
    assert "model.block_size=128 (the source has 64" in err
    assert "set model.n_layer=2 model.n_embd=32 model.block_size=64" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_hub_name_offline_is_one_line(tmp_path):
    data = make_synthetic_shards(tmp_path / "data", train_tokens=4000)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    cmd = python_cmd(tiny_overrides(data, tmp_path / "run", **{"model.init_from": "gpt2-medium"}))
    import subprocess

    from tests.helpers import REPO
    from tests.helpers import env as base_env

    p = subprocess.run(cmd, cwd=REPO, env={**base_env(), **env}, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "model.init_from='gpt2-medium': could not download 'gpt2-medium'" in err
    assert "pass a local directory" in err


def test_padded_vocab_rows_added_then_dropped(tmp_path, hf_dir):
    from pretrain.checkpoint import Checkpointer
    from pretrain.model import GPT, GPTConfig
    from pretrain.model.weights import resolve
    from pretrain.training.init_from import init_from

    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = hf(x).logits

    padded_cfg = GPTConfig.from_preset("tiny-vocab", block_size=64, padded_vocab_size=640)
    padded = GPT(padded_cfg)
    note = init_from(padded, resolve(str(hf_dir)), padded_cfg)
    assert "vocabulary rows 512 -> 640 (added padding)" in note
    assert padded.transformer.wte.weight[512:].abs().sum() == 0
    with torch.no_grad():
        torch.testing.assert_close(padded.eval()(x)[0][..., :512], ref, atol=1e-5, rtol=0)

    # That padded model as a native checkpoint -> a model without padding (rows dropped), and a
    # smaller context (positions cropped).
    Checkpointer(tmp_path / "checkpoints", keep_last=1).save(
        3, padded, None, {"step": 3}, None, {"model": {"preset": "tiny-vocab", "block_size": 64,
                                                         "padded_vocab_size": 640}})
    plain_cfg = GPTConfig.from_preset("tiny-vocab", block_size=16)
    plain = GPT(plain_cfg)
    note = init_from(plain, resolve(str(tmp_path / "checkpoints")), plain_cfg)
    assert "(checkpoint," in note and "640 -> 512 (dropped padding)" in note and "cropped 64 -> 16" in note
    assert plain.lm_head.weight is plain.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x)[0], ref, atol=1e-5, rtol=0)


# lr 3e-4: Adam turns the last-bit differences of two reduction orders into updates of about lr
# on near-zero gradients; at the default 3e-3 they reach 3e-5 after 4 steps.
_PARITY = {"model.block_size": 64, "schedule.max_steps": STEPS, "checkpoint.interval": STEPS, "optim.lr": 3e-4}


def single_process_init_from(tmp_path_factory, hf_dir: Path) -> Path:
    def go():
        run_dir = tmp_path_factory.mktemp("init-from-single")
        run(python_cmd(tiny_overrides(shared_data(tmp_path_factory), run_dir,
                                      **{"model.init_from": str(hf_dir)}, **_PARITY)))
        return run_dir

    return memo("init-from-single", go)


def test_ddp_init_from_equals_single_process(tmp_path_factory, tmp_path, hf_dir):
    single = single_process_init_from(tmp_path_factory, hf_dir)
    run(torchrun_cmd(tiny_overrides(shared_data(tmp_path_factory), tmp_path,
                                    **{"model.init_from": str(hf_dir)}, **_PARITY)), timeout=240)
    assert losses(tmp_path) == pytest.approx(losses(single), abs=1e-5)
    assert_params_equal(final_params(tmp_path, STEPS), final_params(single, STEPS), atol=1e-5)


def test_fsdp2_init_from_equals_single_process(tmp_path_factory, tmp_path, hf_dir):
    data = shared_data(tmp_path_factory)
    single, sharded = single_process_init_from(tmp_path_factory, hf_dir), tmp_path / "fsdp"
    out = run(torchrun_cmd(tiny_overrides(data, sharded, **{"model.init_from": str(hf_dir),
                                                            "distributed.mode": "fsdp"}, **_PARITY)), timeout=240)
    assert "model.init_from: weights of" in out.stdout
    assert losses(sharded) == pytest.approx(losses(single), abs=1e-5)
    assert_params_equal(final_params(sharded, STEPS), final_params(single, STEPS), atol=1e-5)
    # The FSDP run's checkpoints/ (DCP shards) as the source of a new single-process run.
    again = build(tiny_overrides(data, tmp_path / "again", **{"model.init_from": str(sharded / "checkpoints"),
                                                              "model.block_size": 64}))
    try:
        assert again.step == 0
        assert_params_equal(again.model.state_dict(), final_params(sharded, STEPS))
    finally:
        finish(again)
    # Loading into an already sharded model gives the same weights as loading before sharding.
    script = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
              "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
              "-m", "tests.test_init_from", str(hf_dir)]
    check = run(script, timeout=240)
    assert "load after sharding == load before sharding" in check.stdout


def _check_load_after_sharding(src: str) -> None:
    """Under torchrun: init_from before fully_shard and load_into after it give equal shards."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from pretrain.dist import note_group
    from pretrain.model import GPT, GPTConfig
    from pretrain.model.weights import read, resolve
    from pretrain.training.init_from import adapt_state_dict, init_from, load_into

    dist.init_process_group("gloo")
    note_group()
    cfg = GPTConfig.from_preset("tiny-vocab", block_size=64, padded_vocab_size=640)
    torch.manual_seed(0)
    before = GPT(cfg)
    init_from(before, resolve(src), cfg)
    torch.manual_seed(1)  # a different random init: only the load can make them equal
    after = GPT(cfg)
    for m in (before, after):
        for block in m.transformer.h:
            fully_shard(block)
        fully_shard(m)
    src_cfg, src_sd = read(resolve(src))
    load_into(after, adapt_state_dict(src_sd, src_cfg, cfg))
    for (name, a), (_, b) in zip(before.state_dict().items(), after.state_dict().items()):
        assert torch.equal(a.full_tensor(), b.full_tensor()), name
    if dist.get_rank() == 0:
        print("load after sharding == load before sharding", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _check_load_after_sharding(sys.argv[1])
    from pretrain.dist import exit_process

    exit_process(0)  # not sys.exit: gloo's threads can abort the interpreter's finalisation


@pytest.mark.parametrize("option", ["qk_norm", "rotary"])
def test_research_options_take_part_in_the_architecture_check(tmp_path, capsys, option):
    """A checkpoint trained with a research option (qk_norm has no parameters of its own; rotary has
    no wpe) is not a plain GPT-2: init_from into a plain config is refused in one line naming the
    field, before any checkpoint is written; into the same option it loads (rotary: no positions
    to crop)."""
    from pretrain.checkpoint import Checkpointer
    from pretrain.model import GPT, GPTConfig
    from pretrain.model.weights import resolve
    from pretrain.train import main
    from pretrain.training.init_from import init_from

    cfg = GPTConfig.from_preset("tiny-vocab", **{option: True})
    Checkpointer(tmp_path / "src", keep_last=1).save(
        2, GPT(cfg), None, {"step": 2}, None, {"model": {"preset": "tiny-vocab", option: True}})
    data = make_synthetic_shards(tmp_path / "data", train_tokens=4000)
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert main(tiny_overrides(data, run_dir, **{"model.init_from": str(tmp_path / "src")})) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"model.{option}=False (the source has True)" in err and f"set model.{option}=True" in err
    assert not (run_dir / "checkpoints").exists()
    same = GPT(cfg)
    assert "fresh optimizer" in init_from(same, resolve(str(tmp_path / "src")), cfg)
