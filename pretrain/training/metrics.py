"""Logging: one stdout line per step, the run's metrics log (always; ``pretrain/rundir/``), Weights & Biases
(optional, imported lazily, never fatal), and the throughput arithmetic (tokens/s, MFU).

Only rank 0 writes; other ranks get a ``MetricsLogger`` that does nothing.

MFU is model FLOPs utilisation: achieved model FLOPs / the accelerator's dense peak. Model
FLOPs per token follow the PaLM appendix B count used by nanoGPT, ``6N + 12·L·H·Q·T``: 6 FLOPs
per parameter per token (forward 2, backward 4) plus the attention scores and weighted sum
(L layers, H heads, Q head dim, T context), which no parameter accounts for.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from pretrain.rundir.layout import METRICS
from pretrain.rundir.metrics_log import MetricsLog

# Dense peak throughput in FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name():
# (bf16 tensor cores, tf32 tensor cores). Vendor datasheets.
PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("H200", 989.5e12, 494.7e12),
    ("GH200", 989.5e12, 494.7e12),
    ("H100 PCIe", 756.0e12, 378.0e12),
    ("H100 NVL", 835.0e12, 417.5e12),
    ("H100", 989.5e12, 494.7e12),  # SXM
    ("B200", 2250e12, 1100e12),
    ("A100", 312.0e12, 156.0e12),
    ("A10G", 70.0e12, 35.0e12),
    ("A10", 125.0e12, 62.5e12),
    ("L40S", 362.05e12, 183.0e12),
    ("L4", 121.0e12, 60.0e12),
    ("RTX 4090", 165.2e12, 82.6e12),
    ("RTX 3090", 71.0e12, 35.6e12),
    ("V100", 125.0e12, 15.7e12),  # fp16 tensor cores (no bf16); fp32 for the second
]


def resolve_peak(device: torch.device, dtype: str, peak_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where it came from): ``train.peak_tflops`` when set (a device the
    table lacks, or a measured peak), else the ``PEAK_FLOPS`` row whose name is in the CUDA device's,
    else None (no MFU) with the reason. The run report prints the second element."""
    if peak_tflops:
        return peak_tflops * 1e12, f"train.peak_tflops={peak_tflops:g} (set in the config)"
    if device.type != "cuda":
        return None, f"none: {device.type} is not in PEAK_FLOPS (set train.peak_tflops for MFU)"
    name = torch.cuda.get_device_name(device)
    for key, bf16, tf32 in PEAK_FLOPS:
        if key in name:
            kind = "bf16" if dtype == "bf16" else "tf32"
            return (bf16 if dtype == "bf16" else tf32), f"PEAK_FLOPS {key!r} {kind} dense (device {name!r})"
    return None, f"none: {name!r} is not in PEAK_FLOPS (set train.peak_tflops for MFU)"


def _cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_environment(device: torch.device, world_size: int, mode: str, dtype: str, compile: bool,
                    peak: float | None, peak_source: str) -> dict[str, Any]:
    """What a run ran on, for the run's environment record and the run report: device, torch,
    commit (``git describe`` of the code's checkout, ``-dirty`` with local changes), peak FLOP/s."""
    import platform
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=repo,
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device), "device_name": name, "world_size": world_size, "mode": mode, "dtype": dtype,
        "compile": compile, "torch": torch.__version__, "python": platform.python_version(),
        "host": platform.node(), "cpu_count": os.cpu_count(), "commit": commit,
        "peak_flops": peak, "peak_source": peak_source,
    }


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12·L·H·Q·T (N without position embeddings)."""
    return 6.0 * n_params + 12.0 * n_layer * n_head * head_dim * seq_len


def mfu(tokens_per_s: float, flops_token: float, peak_per_device: float | None, world_size: int) -> float | None:
    if not peak_per_device:
        return None
    return tokens_per_s * flops_token / (peak_per_device * world_size)


def memory_gb(device: torch.device) -> float | None:
    """Peak CUDA memory allocated on this device, or this process's resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 1e9
    except Exception:  # psutil missing: memory is a nicety, not a reason to fail
        return None


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    h, rem = divmod(int(s), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


class MetricsLogger:
    """stdout + the metrics log + TensorBoard + optional wandb, rank 0 only."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, wandb_mode: str = "disabled",
                 wandb_project: str = "gpt2-pretrain", wandb_name: str | None = None,
                 config: dict | None = None, resume_step: int | None = None, tensorboard: bool = False,
                 resume_tokens: int | None = None):
        self.enabled = enabled
        self._wandb = None
        self._tb = None
        if not enabled:
            return
        self._file = MetricsLog(run_dir, resume_step)
        if tensorboard:  # rank 0 only, like the rest (pretrain/training/tb_logger.py)
            from pretrain.training.tb_logger import TensorBoardLogger

            self._tb = TensorBoardLogger(run_dir, resume_step, resume_tokens)
        if wandb_mode != "disabled":
            self._wandb = self._init_wandb(wandb_mode, wandb_project, wandb_name or Path(run_dir).name, config, run_dir)

    @staticmethod
    def _init_wandb(mode: str, project: str, name: str, config: dict | None, run_dir):
        try:
            import wandb
        except Exception as e:  # not installed / broken install: log locally only
            print(f"[metrics] wandb unavailable ({e.__class__.__name__}: {e}); logging to {METRICS} only",
                  file=sys.stderr)
            return None
        try:
            return wandb.init(project=project, name=name, mode=mode, config=config, dir=str(run_dir), resume="allow")
        except Exception as e:
            msg = " ".join(str(e).split())
            print(f"[metrics] wandb.init failed ({e.__class__.__name__}: {msg}); logging to {METRICS} only",
                  file=sys.stderr)
            return None

    def print(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def log(self, record: dict[str, Any]) -> None:
        """One step: a JSON line, a wandb point and a short stdout line."""
        if not self.enabled:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                  for k, v in record.items()}
        self._file.append(record)
        if self._tb is not None:
            self._tb.log(record)
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                                step=record["step"])
            except Exception as e:
                print(f"[metrics] wandb.log failed: {e}", file=sys.stderr)
        self.print(format_step(record))

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:
                pass


def format_step(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']:>6}"]
    if r.get("loss") is not None:
        parts.append(f"loss {r['loss']:.4f}")
    if r.get("lr") is not None:
        parts.append(f"lr {r['lr']:.3e}")
    if r.get("grad_norm") is not None:
        parts.append(f"norm {r['grad_norm']:.3f}")
    if r.get("tokens_per_s") is not None:
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    if r.get("dt_ms") is not None:
        parts.append(f"{r['dt_ms']:.0f} ms")
    if r.get("mem_gb") is not None:
        parts.append(f"mem {r['mem_gb']:.2f} GB")
    if r.get("skipped"):
        parts.append(f"SKIPPED (non-finite, {r.get('nonfinite_in_a_row')} in a row)")
    evals = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
             if "/" in k and k != "sample/text"]
    line = " | ".join(parts + evals)
    if "sample/text" in r:
        line += f"\n  sample: {r['sample/text']!r}"
    return line


def startup_summary(*, world_size: int, mode: str, device: torch.device, n_params: int, tokens_per_step: int,
                    micro_batch: int, seq_len: int, accum: int, max_steps: int, start_step: int,
                    total_tokens: int, flops_token: float, peak: float | None, dtype: str, compile: bool,
                    peak_source: str = "") -> str:
    total = total_tokens
    lines = [
        "=" * 72,
        f"world size {world_size} ({mode}) on {device}, dtype {dtype}, compile {compile}",
        f"parameters {n_params:,} ({n_params / 1e6:.1f}M)",
        f"tokens/step {tokens_per_step:,} = micro-batch {micro_batch} x seq {seq_len} x world {world_size}"
        f" x accum {accum}",
        f"steps {start_step} -> {max_steps}, total tokens {total:,} ({total / 1e9:.2f}B)",
        f"FLOPs/token {flops_token:.3e}" + (f"; MFU peak: {peak_source}" if peak_source else ""),
    ]
    if peak:
        # At a typical 40% MFU; the first logged steps give the real figure.
        est = (max_steps - start_step) * tokens_per_step * flops_token / (0.4 * peak * world_size)
        lines.append(f"estimated time at 40% MFU: {_fmt_seconds(est)}")
    lines.append("=" * 72)
    return "\n".join(lines)
