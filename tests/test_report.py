"""The run report (pretrain/report.py, gpt2-report) and the MFU peak it names (train.peak_tflops,
pretrain/training/metrics.py resolve_peak)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from pretrain.report import main, render
from pretrain.training import metrics


def write_run(run_dir, steps: int = 20):
    from pretrain.config import Config

    run_dir.mkdir(parents=True)
    cfg = Config()
    cfg.optim.lr = 1e-3
    cfg.eval.tasks = ["lambada_openai"]
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    rows = []
    for s in range(1, steps + 1):
        r = {"step": s, "tokens_seen": 1000 * s, "loss": 10 - s / 10, "lr": 1e-3, "tokens_per_s": 1000.0 + s,
             "mfu": 0.40 + s / 1000, "time": 1000.0 + 2 * s, "dt_ms": 2000.0}
        if s % 10 == 0:
            r.update({"val/loss": 9.0 - s / 100, "hellaswag/acc_norm": 0.25 + s / 1000,
                      "tasks/lambada_openai/acc": 0.1, "tasks/lambada_openai/perplexity": 900.0,
                      "sample/text": f"Hello at {s}"})
        rows.append(json.dumps(r))
    (run_dir / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    env = metrics.run_environment(torch.device("cpu"), 1, "single", "fp32", False, 5e13,
                                  "train.peak_tflops=50 (set in the config)")
    (run_dir / "environment.json").write_text(json.dumps([{"start_step": 0, **env}]))
    (run_dir / "eval.json").write_text(json.dumps({"results": {"val/loss": 8.5, "hellaswag/acc_norm": 0.27}}))
    return run_dir


def test_report_names_environment_config_throughput_evaluations_plot_and_sample(tmp_path):
    run = write_run(tmp_path / "run")
    text = render(run)
    assert text.startswith("# Run report: run")
    assert "| `optim.lr` | 0.0006 | 0.0010 |" in text and "`schedule.max_steps`" not in text
    assert "| `eval.tasks` | `[]` | `['lambada_openai']` |" in text
    assert "cpu" in text and torch.__version__ in text
    # tokens/s and MFU: medians over steps 3..20; the peak's source as recorded at the start
    assert "1,012" in text and "41.2%" in text and "peak used: train.peak_tflops=50" in text
    assert "wall time, first to last logged step: 0m40s" in text
    # evaluations: last in-training value, gpt2-eval's, GPT-2 124M's where the task and metric match
    assert "| `hellaswag/acc_norm` | 0.2700 @ 20 | 0.2700 | 0.3114 (build-nanogpt" in text
    assert "| `tasks/lambada_openai/acc` | 0.1000 @ 20 |  | 0.3256 (lm-evaluation-harness issue #2159" in text
    assert "| `val/loss` | 8.8000 @ 20 | 8.5000 |  |" in text
    assert "![loss curves](loss.png)" in text and (run / "loss.png").stat().st_size > 10_000
    assert "(step 20) Hello at 20" in text


def test_gpt2_report_writes_the_file_and_refuses_a_non_run_in_one_line(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert main([str(run)]) == 0 and (run / "report.md").read_text().startswith("# Run report")
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpt2-report: error:") and "nope" in err[0]


def test_peak_override_table_and_unknown_device(monkeypatch):
    cpu = torch.device("cpu")
    assert metrics.resolve_peak(cpu, "bf16") == (None, "none: cpu is not in PEAK_FLOPS (set train.peak_tflops for MFU)")
    peak, src = metrics.resolve_peak(cpu, "bf16", 123.0)
    assert peak == 123e12 and src.startswith("train.peak_tflops=123")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert metrics.resolve_peak(cuda, "bf16") == (989.5e12, "PEAK_FLOPS 'H100' bf16 dense (device 'NVIDIA H100 80GB HBM3')")
    assert metrics.resolve_peak(cuda, "fp32")[0] == 494.7e12
    assert metrics.resolve_peak(cuda, "bf16", 700.0)[0] == 700e12  # the override wins over the table
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA Future GPU")
    assert metrics.resolve_peak(cuda, "bf16")[0] is None
    assert math.isclose(metrics.mfu(1000.0, 1e9, 123e12, 1), 1e12 / 123e12)


def test_peak_tflops_is_validated():
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.peak_tflops"):
        load_config(None, ["train.peak_tflops=-1"])
    assert load_config(None, ["train.peak_tflops=312"]).train.peak_tflops == 312.0
    assert yaml.safe_load(load_config(None, []).to_yaml())["train"]["peak_tflops"] is None
