"""What ``logging.tensorboard: true`` costs per logged step (pretrain/training/tb_logger.py).

Times ``MetricsLogger.log`` (metrics.jsonl line + stdout line, plus the TensorBoard points and
the flush when on) on a record shaped like a training step's, with and without TensorBoard,
interleaved round by round so a shared CPU slows both alike; prints the median per call of each
and the difference. The trainer calls ``log`` once per ``train.log_interval`` steps, so the
difference is the added time per logged step.

    python benchmarks/tensorboard_overhead.py [--calls 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time


def time_logger(tensorboard: bool, calls: int, start_step: int) -> float:
    """Seconds per ``log`` call."""
    from pretrain.training.metrics import MetricsLogger

    with tempfile.TemporaryDirectory() as d:
        logger = MetricsLogger(d, enabled=True, tensorboard=tensorboard)
        sink = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sink):
            for i in range(calls):
                step = start_step + i
                logger.log({"step": step, "tokens_seen": 524288 * step, "loss": 3.2 + 1e-4 * i, "lr": 6e-4,
                            "grad_norm": 0.31, "tokens_per_s": 612345.0, "mfu": 0.53, "time": time.time(),
                            "dt_ms": 856.2, "mem_gb": 41.7})
        dt = (time.perf_counter() - t0) / calls
        logger.close()
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    off, on = [], []
    time_logger(True, 20, 0)  # warm up imports
    for r in range(args.rounds):
        off.append(time_logger(False, args.calls, r * args.calls))
        on.append(time_logger(True, args.calls, r * args.calls))
    m_off, m_on = statistics.median(off), statistics.median(on)
    print(f"log() without TensorBoard: {1e6 * m_off:8.1f} us/call (rounds: {', '.join(f'{1e6 * x:.0f}' for x in off)})")
    print(f"log() with TensorBoard:    {1e6 * m_on:8.1f} us/call (rounds: {', '.join(f'{1e6 * x:.0f}' for x in on)})")
    print(f"added per logged step:     {1e6 * (m_on - m_off):8.1f} us")


if __name__ == "__main__":
    main()
