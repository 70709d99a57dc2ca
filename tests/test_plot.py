"""pretrain.plot on synthetic metrics.jsonl files: the PNG, overlays, "no data", errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import plot

REPO = Path(__file__).resolve().parents[1]


def write_run(run_dir: Path, steps: int = 40, hellaswag: bool = True, eval_every: int = 10) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(1, steps + 1):
        r = {"step": s, "tokens_seen": 2048 * s, "loss": 10.8 * math.exp(-s / 20) + 3.0,
             "lr": 1e-3 * min(1.0, s / 5), "grad_norm": 1.0, "tokens_per_s": 1500.0 + s,
             "mfu": None, "time": 1.7e9 + s}
        if s % eval_every == 0:
            r["val/loss"] = r["loss"] + 0.2
            if hellaswag:
                r["hellaswag/acc"] = 0.25 + s / 1000
                r["hellaswag/acc_norm"] = 0.26 + s / 1000
        lines.append(json.dumps(r))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_read_metrics_last_line_of_a_step_wins_and_torn_tail_is_skipped(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(
        json.dumps({"step": 1, "loss": 9.0}) + "\n"
        + json.dumps({"step": 2, "loss": 8.0}) + "\n"
        + json.dumps({"step": 2, "loss": 7.5}) + "\n"   # re-done after a resume
        + '{"step": 3, "lo'                              # torn by a kill
    )
    records = plot.read_metrics(p)
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["loss"] == 7.5


def test_series_skips_missing_and_non_finite(tmp_path):
    run = plot.Run("r", tmp_path, [{"step": 1, "loss": 3.0}, {"step": 2, "loss": None}, {"step": 3}])
    assert run.series("step", "loss") == ([1.0], [3.0])


def test_one_run_writes_png_next_to_metrics(tmp_path, capsys):
    run = write_run(tmp_path / "demo-run")
    assert plot.main([str(run)]) == 0
    assert is_png(run / "loss.png")
    assert "wrote" in capsys.readouterr().out


def test_several_runs_overlaid_and_no_data_panels(tmp_path, monkeypatch):
    a = write_run(tmp_path / "a", hellaswag=True)
    b = write_run(tmp_path / "b", steps=25, hellaswag=False)
    drawn = {}
    real_plot = plot.plot_runs

    def spy(runs, out):
        drawn["names"] = [r.name for r in runs]
        return real_plot(runs, out)

    monkeypatch.setattr(plot, "plot_runs", spy)
    out = tmp_path / "cmp.png"
    assert plot.main([str(a), str(b / "metrics.jsonl"), "--out", str(out)]) == 0
    assert is_png(out)
    assert drawn["names"] == ["a", "b"]


def test_panels_without_data_say_so(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = plot.load_runs([write_run(tmp_path / "r", hellaswag=False)])
    texts = []
    orig = plt.Axes.text

    def record(self, *args, **kwargs):
        texts.append((self.get_title(), args[2] if len(args) > 2 else kwargs.get("s")))
        return orig(self, *args, **kwargs)

    plt.Axes.text = record
    try:
        plot.plot_runs(run, tmp_path / "x.png")
    finally:
        plt.Axes.text = orig
    no_data = sorted(t for t, s in texts if s == "no data")
    assert no_data == ["HellaSwag vs optimizer step", "HellaSwag vs tokens seen"]


def test_duplicate_run_names_are_disambiguated(tmp_path):
    runs = plot.load_runs([write_run(tmp_path / "x" / "run"), write_run(tmp_path / "y" / "run")])
    assert runs[0].name != runs[1].name and runs[0].name.endswith("run")


def test_missing_metrics_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.plot", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "metrics.jsonl" in lines[0] and "nope" in lines[0]


def test_empty_and_garbage_metrics_are_clear_errors(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "metrics.jsonl").write_text("")
    with pytest.raises(plot.PlotError, match="no metrics yet"):
        plot.load_runs([tmp_path / "e"])
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "metrics.jsonl").write_text("hello\n" + json.dumps({"step": 1}) + "\n")
    with pytest.raises(plot.PlotError, match=r"metrics.jsonl:1"):
        plot.load_runs([tmp_path / "g"])


def test_help_lists_defaults():
    text = plot.build_parser().format_help()
    assert "--out" in text and "default" in text
