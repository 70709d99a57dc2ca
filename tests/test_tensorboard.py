"""logging.tensorboard: the metrics.jsonl scalars as TensorBoard event files, read back with
TensorBoard's own reader (EventAccumulator), across a kill and a resume."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.helpers import make_synthetic_shards, metrics, python_cmd, run, tiny_overrides

pytest.importorskip("tensorboard")


def raw_points(directory: Path) -> dict[str, list[int]]:
    """{tag: [step, ...]} of every point in every event file, in file order, with no purging or
    de-duplication: what any reader of the files would see."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, list[int]] = {}
    for path in sorted(directory.glob("*tfevents*")):
        for ev in EventFileLoader(str(path)).Load():
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append(ev.step)
    return out


def test_kill_and_resume_gives_each_step_once(tmp_path):
    from pretrain.training.tb_logger import read_scalars

    data = make_synthetic_shards(tmp_path / "data")
    run_dir = tmp_path / "run"
    # Rank 0 dies right after step 6 (before logging it); checkpoints at 4 and 8. The first
    # attempt wrote points 1..5; the resumed one redoes 5..8.
    cmd = python_cmd(tiny_overrides(data, run_dir, **{"logging.tensorboard": "true"}))
    assert run(cmd, check=False, fault="crash:6").returncode == 13
    tb = run_dir / "tensorboard"
    assert read_scalars(tb)["train/loss"][-1][0] == 5
    out = run(cmd).stdout
    assert "resumed from" in out

    rows = metrics(run_dir)
    scalars = read_scalars(tb)
    steps = [s for s, _ in scalars["train/loss"]]
    assert steps == list(range(1, 9)) == [r["step"] for r in rows]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [v for _, v in scalars["train/lr"]] == pytest.approx([r["lr"] for r in rows], rel=1e-6)
    assert [s for s, _ in scalars["by_tokens/train/loss"]] == [r["tokens_seen"] for r in rows]
    for key in ("grad_norm", "tokens_per_s", "dt_ms", "mem_gb"):
        assert len(scalars[f"train/{key}"]) == 8, key
    # The files themselves hold each step once (not merely hidden by TensorBoard's purge logic).
    raw = raw_points(tb)
    assert raw["train/loss"] == list(range(1, 9))
    assert raw["by_tokens/train/grad_norm"] == [256 * s for s in range(1, 9)]


def test_eval_keys_and_sample_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.training.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=True)
    logger.log({"step": 1, "tokens_seen": 100, "loss": 5.0, "mfu": None, "time": 1.0})
    logger.log({"step": 2, "tokens_seen": 200, "loss": 4.0, "val/loss": 4.5, "hellaswag/acc_norm": 0.3,
                "skipped": True, "sample/text": "Hello, world"})
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "val/loss", "hellaswag/acc_norm", "train/skipped", "by_tokens/val/loss"} <= set(tags["scalars"])
    assert "train/mfu" not in tags["scalars"] and "train/time" not in tags["scalars"]
    assert [(e.step, e.value) for e in acc.Scalars("by_tokens/train/loss")] == [(100, 5.0), (200, 4.0)]
    (text,) = acc.Tensors("sample/text_summary")
    assert text.step == 2 and text.tensor_proto.string_val[0] == b"Hello, world"


def test_torn_record_and_points_past_the_checkpoint_are_dropped(tmp_path):
    from pretrain.training.tb_logger import TensorBoardLogger, read_scalars

    first = TensorBoardLogger(tmp_path)
    for step in range(1, 7):
        first.log({"step": step, "tokens_seen": 10 * step, "loss": float(step)})
    first.close()
    (path,) = (tmp_path / "tensorboard").glob("*tfevents*")
    with open(path, "ab") as f:
        f.write(b"\x10\x00\x00")  # a record cut short by a kill
    resumed = TensorBoardLogger(tmp_path, resume_step=4, resume_tokens=40)
    assert resumed.dropped == 4  # steps 5, 6 on both axes
    resumed.log({"step": 5, "tokens_seen": 50, "loss": 50.0})
    resumed.close()
    scalars = read_scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
    assert [s for s, _ in scalars["by_tokens/train/loss"]] == [10, 20, 30, 40, 50]
    # A fresh start (no checkpoint) keeps nothing, like metrics.jsonl.
    TensorBoardLogger(tmp_path).close()
    assert read_scalars(tmp_path / "tensorboard") == {}


def test_a_damaged_event_file_loses_nothing_before_the_checkpoint(tmp_path, capsys):
    """A byte flipped inside an early record (not a torn tail): the resume keeps every point it can
    read, before and after the damage (TensorBoard's reader would stop at it), keeps the original
    bytes beside it under a name TensorBoard does not read, and says so in one line."""
    from pretrain.training.tb_logger import TensorBoardLogger, read_scalars

    first = TensorBoardLogger(tmp_path)
    for step in range(1, 9):
        first.log({"step": step, "tokens_seen": 10 * step, "loss": float(step), "lr": 0.1 * step})
    first.close()
    (path,) = (tmp_path / "tensorboard").glob("*tfevents*")
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[len(original) // 4] ^= 0xFF  # inside the records of an early step
    path.write_bytes(bytes(damaged))
    capsys.readouterr()
    resumed = TensorBoardLogger(tmp_path, resume_step=8, resume_tokens=80)
    resumed.close()
    note = capsys.readouterr().out.strip().splitlines()
    assert len(note) == 1 and "is damaged" in note[0] and ".damaged" in note[0], note
    (aside,) = (tmp_path / "tensorboard").glob("*.damaged")
    assert aside.read_bytes() == bytes(damaged) and "tfevents" not in aside.name
    steps = [s for s, _ in read_scalars(tmp_path / "tensorboard")["train/loss"]]
    assert len(steps) >= 7 and steps[-1] == 8 and steps[0] in (1, 2), steps  # one record lost at most


def test_missing_package_is_one_line(monkeypatch):
    from pretrain.config import ConfigError, load_config
    from pretrain.plan import make_plan

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError) as e:  # the run plan checks the environment
        make_plan(load_config(None, ["logging.tensorboard=true"]), 1)
    msg = str(e.value)
    assert "\n" not in msg and "pip install -e '.[tensorboard]'" in msg and "logging.tensorboard=false" in msg
    load_config(None, ["logging.tensorboard=false"])  # the default needs nothing
