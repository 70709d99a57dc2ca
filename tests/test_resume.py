"""Resume is exact: a run killed (SIGKILL) or preempted (SIGUSR1 / SIGTERM through torchrun) and
resumed equals the uninterrupted run bit for bit; a checkpoint resumes on another world size
with the same token stream; a crash inside a save leaves the previous checkpoint usable; a
corrupted checkpoint is refused."""

from __future__ import annotations

import shutil
import signal
import textwrap

import pytest
from helpers import (
    PY,
    RECIPES,
    REPO,
    STEPS,
    assert_params_equal,
    checkpoint,
    committed,
    final_params,
    finish,
    kill_tree,
    last_step,
    losses,
    metrics,
    python_cmd,
    reference_ddp,
    reference_single,
    run,
    shared_data,
    start,
    tiny_overrides,
    torchrun_cmd,
    wait_for,
)

from pretrain.train import main

SLOW = "sleep:0.3"  # a fault (tests/faults.py): time to signal a run between two steps


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_single_process_sigkill_then_resume_is_bitwise(tmp_path_factory, recipe):
    ref = reference_single(tmp_path_factory, recipe)
    run_dir = tmp_path_factory.mktemp("killed-single")
    args = tiny_overrides(shared_data(tmp_path_factory), run_dir, **RECIPES[recipe])
    p = start(python_cmd(args), fault=SLOW)
    wait_for(lambda: committed(run_dir, 4), 120, p, "the step-4 checkpoint")
    kill_tree(p, signal.SIGKILL)
    p.wait(30)
    assert last_step(run_dir) < STEPS
    run(python_cmd(args), fault=SLOW)
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, STEPS + 1))
    assert losses(run_dir) == losses(ref)
    assert_params_equal(final_params(run_dir, STEPS), final_params(ref, STEPS))


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_resume_on_two_ranks_from_a_one_rank_checkpoint(tmp_path_factory, tmp_path, recipe):
    """The 1-process checkpoint of step 4, continued by 2 DDP ranks: same token stream, so the
    same losses and weights as the 1-process run (up to reduction order). With ``muon-wsd`` the
    checkpoint follows a batch-size warmup (steps 0-2 at half the batch) and holds Muon's state."""
    ref = reference_single(tmp_path_factory, recipe)
    args = tiny_overrides(shared_data(tmp_path_factory), tmp_path, **RECIPES[recipe]) + [
        "--resume", str(checkpoint(ref, 4))]
    out = run(torchrun_cmd(args))
    assert "resumed from" in out.stdout and "world size 2" in out.stdout
    assert [r["step"] for r in metrics(tmp_path)] == [5, 6, 7, 8]
    assert losses(tmp_path) == pytest.approx(losses(ref)[4:], abs=1e-5)
    assert_params_equal(final_params(tmp_path, STEPS), final_params(ref, STEPS), atol=1e-5)


def test_ddp_preempt_sigusr1_sigterm_sigkill_then_finish_is_bitwise(tmp_path_factory, tmp_path):
    """One 2-rank run through torchrun, interrupted three times: SIGUSR1 to torchrun, SIGTERM to
    torchrun (each: every rank finishes its step, saves that same step, exits 75), then SIGKILL
    of the whole process tree after a checkpoint; the fourth launch finishes. Losses and final
    weights equal the uninterrupted 2-rank run exactly."""
    ref = reference_ddp(tmp_path_factory)
    args = tiny_overrides(shared_data(tmp_path_factory), tmp_path, **{"checkpoint.interval": 2})
    launcher = ["--signals-to-handle=SIGTERM,SIGINT,SIGUSR1", "--shutdown-timeout=60"]
    stops = []
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        before = last_step(tmp_path)
        p = start(torchrun_cmd(args, extra=launcher), fault=SLOW)
        wait_for(lambda b=before: last_step(tmp_path) > b, 120, p, "a new step")
        p.send_signal(sig)  # to torchrun only: it forwards the signal to its workers
        _, out = finish(p, 120)
        step = last_step(tmp_path)
        assert step < STEPS, f"{sig.name} came too late to test anything"
        assert f"checkpoint at step {step}; exiting 75" in out, out[-4000:]
        ckpt = checkpoint(tmp_path, step)
        assert committed(tmp_path, step)
        assert (ckpt / "rank_0.pt").exists() and (ckpt / "rank_1.pt").exists()  # the same step on every rank
        stops.append(step)
    assert stops[1] > stops[0]
    # SIGKILL (no chance to save) once a checkpoint after the last preemption is committed.
    p = start(torchrun_cmd(args, extra=launcher), fault=SLOW)
    nxt = stops[1] + 2 - stops[1] % 2
    if nxt < STEPS:
        wait_for(lambda: committed(tmp_path, nxt), 120, p, f"the step-{nxt} checkpoint")
        kill_tree(p, signal.SIGKILL)
        p.wait(30)
        p = start(torchrun_cmd(args, extra=launcher), fault=SLOW)
    rc, out = finish(p, 180)
    assert rc == 0, out[-4000:]
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, STEPS + 1))
    assert losses(tmp_path) == losses(ref)
    assert_params_equal(final_params(tmp_path, STEPS), final_params(ref, STEPS))


CRASH_IN_SAVE = textwrap.dedent("""
    import os, sys, torch
    real_save = torch.save

    def save(obj, f, *a, **k):  # die half-way through writing optim.pt of the step-{step} checkpoint
        name = getattr(f, "name", str(f))
        if "step_{step:08d}.tmp" in str(name) and str(name).endswith("optim.pt"):
            f.write(b"half a file")
            f.flush()
            os._exit(9)
        return real_save(obj, f, *a, **k)

    torch.save = save
    sys.path.insert(0, {repo!r})
    from pretrain.train import main
    sys.exit(main(sys.argv[1:]))
""")


def test_crash_inside_a_save_then_resume(tmp_path_factory, tmp_path):
    """A process that dies while writing checkpoint 8 leaves checkpoint 4 as the newest
    complete one; the rerun resumes from it and ends where the uninterrupted run ended."""
    ref = reference_single(tmp_path_factory)
    script = tmp_path / "crash_in_save.py"
    script.write_text(CRASH_IN_SAVE.format(step=STEPS, repo=str(REPO)))
    args = tiny_overrides(shared_data(tmp_path_factory), tmp_path / "run")
    p = run([PY, str(script), *args], check=False)
    assert p.returncode == 9
    assert (tmp_path / "run" / "checkpoints" / f"step_{STEPS:08d}.tmp").exists()
    assert not committed(tmp_path / "run", STEPS)
    out = run(python_cmd(args))
    assert "resumed from" in out.stdout and "step_00000004" in out.stdout
    assert losses(tmp_path / "run") == losses(ref)
    assert_params_equal(final_params(tmp_path / "run", STEPS), final_params(ref, STEPS))


def test_bit_flipped_checkpoint_is_refused(tmp_path_factory, tmp_path, capsys):
    ref = reference_single(tmp_path_factory)
    run_dir = tmp_path / "run"
    shutil.copytree(ref / "checkpoints", run_dir / "checkpoints")
    model_pt = checkpoint(run_dir, STEPS) / "model.pt"
    data = bytearray(model_pt.read_bytes())
    data[len(data) // 2] ^= 0x01
    model_pt.write_bytes(bytes(data))
    args = tiny_overrides(shared_data(tmp_path_factory), run_dir, **{"schedule.max_steps": STEPS + 1})
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "model.pt" in err and "\n" not in err
    assert "sha256" in err or "checksum" in err or "corrupt" in err
    assert not (run_dir / "metrics.jsonl").exists() or not metrics(run_dir)  # refused before training
