"""The metrics log, ``RUN_DIR/metrics.jsonl``: its writer (the trainer's rank 0) and its reader
(gpt2-plot, the run report, the model card).

One JSON object per line with ``step``, ``tokens_seen``, ``loss``, ``lr``, ``grad_norm``,
``tokens_per_s``, ``mfu``, ``time`` and, on eval steps, the evaluators' keys (``val/loss``,
``hellaswag/acc``, ...); a non-finite number is written as null. A resumed run first drops the
lines after its checkpoint's step (they are redone), a fresh start drops every line. Reading, a
torn last line (a killed run) is skipped, and when a step appears twice its last line wins.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pretrain.rundir.layout import METRICS


class MetricsLogError(ValueError):
    """A metrics log that cannot be read; the message is one line naming the path and the fix."""


class MetricsLog:
    """The writer: opened at a start (truncated after ``resume_step``; None = a fresh start), one
    line per :meth:`append`, line-buffered so a killed run loses at most its last line."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None) -> None:
        self.path = Path(run_dir) / METRICS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._file = open(self.path, "a", buffering=1)

    def _truncate_after(self, step: int | None) -> None:
        if not self.path.exists():
            return
        keep = []
        if step is not None:
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a killed run
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")

    def close(self) -> None:
        self._file.close()


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool): a value the logs plot and compare."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metrics_path(run: str | os.PathLike) -> Path:
    """``run`` is a run directory (holding metrics.jsonl) or the metrics file itself."""
    p = Path(run)
    if p.is_dir():
        p = p / METRICS
    if not p.is_file():
        raise MetricsLogError(
            f"{p} not found: pass a run directory written by pretrain/train.py (its train.run_dir, "
            f"which holds {METRICS}) or the {METRICS} file itself"
        )
    return p


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, one per step, in step order (the last line of a step wins)."""
    by_step: dict[int, dict[str, Any]] = {}
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue  # a torn last line from a killed run
            raise MetricsLogError(
                f"{path}:{i + 1}: not a JSON object; is this a {METRICS} of pretrain/train.py?") from None
        if not isinstance(record, dict) or not is_number(record.get("step")):
            raise MetricsLogError(f"{path}:{i + 1}: a metrics line needs a numeric 'step'; got {line[:80]!r}")
        by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def run_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The run's metrics records; [] when it has no log."""
    p = Path(run_dir) / METRICS
    return read_metrics(p) if p.is_file() else []
