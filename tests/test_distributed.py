"""Multi-process training through real torchrun on gloo: DDP and FSDP2 equal one process on the
same global batch; the CPU smoke config under torchrun; two "nodes" with a crashed worker
restarted by torchrun (--max-restarts) and resumed from the last checkpoint."""

from __future__ import annotations

import pytest
from helpers import (
    PY,
    RECIPES,
    REPO,
    STEPS,
    TRAIN,
    assert_params_equal,
    final_params,
    finish,
    free_port,
    losses,
    make_text_shards,
    metrics,
    reference_ddp,
    reference_single,
    run,
    shared_data,
    start,
    tiny_overrides,
    torchrun_cmd,
)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_ddp_matches_single_process(tmp_path_factory, recipe):
    single, ddp = reference_single(tmp_path_factory, recipe), reference_ddp(tmp_path_factory, recipe)
    assert len(losses(single)) == STEPS
    assert losses(ddp) == pytest.approx(losses(single), abs=1e-5)
    assert_params_equal(final_params(ddp, STEPS), final_params(single, STEPS), atol=1e-5)
    assert losses(single)[-1] < losses(single)[0]
    if recipe == "muon-wsd":  # the batch-size warmup: 128 tokens for steps 0-2, then 256, on 1 or 2 ranks
        seen = [128, 256, 384, 640, 896, 1152, 1408, 1664]
        assert [r["tokens_seen"] for r in metrics(single)] == seen == [r["tokens_seen"] for r in metrics(ddp)]
        lrs = [r["lr"] for r in metrics(single)]
        assert lrs[1:4] == [3e-3] * 3 and lrs[4] > lrs[5] > lrs[6] > lrs[7] > 0  # stable, then the cool-down


def test_fsdp2_matches_single_process(tmp_path_factory, tmp_path):
    single = reference_single(tmp_path_factory)
    run(torchrun_cmd(tiny_overrides(shared_data(tmp_path_factory), tmp_path, **{"distributed.mode": "fsdp"})))
    assert losses(tmp_path) == pytest.approx(losses(single), abs=1e-5)
    # The FSDP checkpoint (DCP shards) gathers to the same full parameters.
    assert_params_equal(final_params(tmp_path, STEPS), final_params(single, STEPS), atol=1e-5)


def test_smoke_config_under_torchrun(tmp_path):
    data = make_text_shards(tmp_path / "python-docs", train_chars=100_000, val_chars=20_000)
    out = run(torchrun_cmd([f"data.dir={data}", f"train.run_dir={tmp_path / 'run'}", "schedule.max_steps=5",
                            "schedule.warmup_steps=2", "optim.lr=1e-2", "eval.interval=5", "eval.val_tokens=1024",
                            "eval.sample_tokens=4", "train.log_interval=1"],
                           config=str(REPO / "configs" / "smoke_cpu.yaml")), timeout=240)
    assert "world size 2 (ddp)" in out.stdout
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0 and "val/loss" in rows[-1]


def test_two_nodes_worker_crash_restarts_and_resumes(tmp_path_factory, tmp_path):
    """Two torchrun agents (one rank each) rendezvous on localhost; rank 0 crashes once after
    step 6 (checkpoints at 4); torchrun restarts both workers, which resume from step 4 and
    finish with exactly the uninterrupted two-rank run's losses and weights."""
    ref = reference_ddp(tmp_path_factory)
    port = free_port()
    args = tiny_overrides(shared_data(tmp_path_factory), tmp_path)
    procs = [
        start([PY, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
               f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes", f"--node_rank={n}", "--max-restarts=1",
               "--monitor_interval=0.2", TRAIN, *args], fault="crash:6")
        for n in (0, 1)
    ]
    results = [finish(p, timeout=240) for p in procs]
    for rc, out in results:
        assert rc == 0, out[-6000:]
    assert (tmp_path / ".fault_injected_crash_6").exists()
    assert any("resumed from" in out and "step_00000004" in out for _, out in results)
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, STEPS + 1))
    assert losses(tmp_path) == losses(ref)
    assert_params_equal(final_params(tmp_path, STEPS), final_params(ref, STEPS))
