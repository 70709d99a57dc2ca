"""TensorBoard event files for a run (``logging.tensorboard: true``), written by rank 0 into
``run_dir/tensorboard``: ``tensorboard --logdir runs/`` shows every run.

What is written, per metrics-log record (the same numbers, no others):

- every numeric value against the optimizer step: ``train/loss``, ``train/lr``, ``train/grad_norm``,
  ``train/tokens_per_s``, ``train/mfu``, ``train/dt_ms``, ``train/mem_gb``, ... (a key without a
  ``/`` goes under ``train/``), and eval keys as they are (``val/loss``, ``hellaswag/acc_norm``,
  ``time/val_loss_s``);
- the same values against tokens seen, under ``by_tokens/`` (TensorBoard has one x-axis per
  point, so the second axis is a second tag family);
- the eval sample (``sample/text``) to the text plugin.

Resume: a run killed after its last checkpoint (step N) has written points past N that the
resumed run writes again. Event files are append-only, so on start every existing file is read
back and, when it holds points past N (or a torn last record from the kill), rewritten without
them (a temporary file, then an atomic ``os.replace``) -- the files then read as one run with
each step once, for TensorBoard and for any other reader. A damaged file (a flipped byte, not a
torn tail) loses nothing before the checkpoint: every intact record is kept (reading resumes after
the damage) and the original is kept beside it (:func:`compact`). A fresh start (no checkpoint) keeps
nothing, as the metrics log does. Every ``log`` flushes, so what a later resume keeps is on
disk: the cost is measured in ``benchmarks/RESULTS.md`` (TensorBoard logging).

``tensorboard`` is an optional dependency (``pip install -e '.[tensorboard]'``); the config's
validation refuses ``logging.tensorboard=true`` in one line when it is missing.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from pretrain.rundir.layout import TENSORBOARD

TOKENS_PREFIX = "by_tokens/"
_NOT_SCALARS = ("step", "tokens_seen", "time")


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics-log key (step axis)."""
    return key if "/" in key else f"train/{key}"


def _record_at(data: bytes, pos: int, crc) -> bytes | None:
    """The record starting at byte ``pos`` if one is there intact (TFRecord framing: u64 length,
    masked crc32c of it, the data, masked crc32c of the data), else None."""
    if pos + 12 > len(data):
        return None
    (length,) = struct.unpack_from("<Q", data, pos)
    if struct.unpack_from("<I", data, pos + 8)[0] != crc(data[pos : pos + 8]):
        return None
    end = pos + 12 + length
    if end + 4 > len(data) or struct.unpack_from("<I", data, end)[0] != crc(data[pos + 12 : end]):
        return None
    return data[pos + 12 : end]


def read_records(path: Path) -> tuple[list[bytes], list[tuple[int, int]], bool]:
    """Every intact record of an event file, the byte ranges that are not (damage: a bad crc or a
    length that runs past the next intact record; reading resumes at the next intact record), and
    whether the only bad range is a torn tail (a record cut short by a kill: its declared length
    runs past the end of the file). TensorBoard's own reader stops at the first bad record."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as crc

    data = path.read_bytes()
    records, bad, pos = [], [], 0
    while pos < len(data):
        rec = _record_at(data, pos, crc)
        if rec is not None:
            records.append(rec)
            pos += 16 + len(rec)
            continue
        nxt = next((q for q in range(pos + 1, len(data) - 15) if _record_at(data, q, crc) is not None), len(data))
        bad.append((pos, nxt))
        pos = nxt
    torn = False
    if len(bad) == 1 and bad[0][1] == len(data):
        start = bad[0][0]
        cut = len(data) - start < 12 or 16 + struct.unpack_from("<Q", data, start)[0] > len(data) - start
        torn = cut and (len(data) - start < 12 or struct.unpack_from("<I", data, start + 8)[0] == crc(data[start : start + 8]))
    return records, bad, torn


def compact(directory: Path, max_step: int, max_tokens: int) -> int:
    """Drop from every event file in ``directory`` the points after ``max_step`` (step-axis tags)
    or after ``max_tokens`` (``by_tokens/`` tags) and a torn last record; returns the number of
    points dropped. Each file is replaced atomically by its kept records; files left without points
    are removed. Nothing before the checkpoint is ever lost: a file that is damaged (not merely torn
    at the end) keeps every record that can be read, wherever it lies, and the original bytes are
    kept beside it as ``<name>.damaged`` (a name TensorBoard does not read), said in one line."""
    from tensorboard.compat.proto.event_pb2 import Event

    dropped = 0
    for path in sorted(directory.glob("*tfevents*")):
        if path.name.endswith(".tmp"):  # a rewrite interrupted before its os.replace
            path.unlink()
            continue
        if path.name.endswith(".damaged"):
            continue
        raws, bad, torn = read_records(path)
        keep, points = [], 0
        for raw in raws:
            ev = Event.FromString(raw)
            if ev.HasField("summary") and ev.summary.value:
                tokens_axis = all(v.tag.startswith(TOKENS_PREFIX) for v in ev.summary.value)
                if ev.step > (max_tokens if tokens_axis else max_step):
                    dropped += 1
                    continue
                points += 1
            keep.append(raw)
        if bad and not torn:
            aside = path.with_name(path.name.replace("tfevents", "damaged-events") + ".damaged")
            os.replace(path, aside)
            print(f"tensorboard: {path.name} is damaged ({sum(b - a for a, b in bad)} unreadable bytes); kept as "
                  f"{aside}, its {len(raws)} readable records rewritten", flush=True)
        elif points == 0:
            path.unlink()
            continue
        elif len(keep) == len(raws) and not torn:
            continue
        if keep:
            _write_records(path, keep)
    return dropped


def _write_records(path: Path, records: list[bytes]) -> None:
    from tensorboard.summary.writer.record_writer import RecordWriter

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        w = RecordWriter(f)
        for raw in records:
            w.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TensorBoardLogger:
    """Rank 0's TensorBoard writer; ``MetricsLogger`` calls ``log`` with each metrics record."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None, resume_tokens: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_dir) / TENSORBOARD
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dropped = compact(self.dir, resume_step or 0, resume_tokens or 0)
        # Every log() flushes itself; the queue and timer only matter between flushes.
        self.writer = SummaryWriter(log_dir=str(self.dir), max_queue=1000, flush_secs=3600)

    def log(self, record: dict[str, Any]) -> None:
        step, tokens = int(record["step"]), record.get("tokens_seen")
        for key, value in record.items():
            if key in _NOT_SCALARS or value is None:
                continue
            if key == "sample/text":
                self.writer.add_text("sample", str(value), step)
            elif isinstance(value, (int, float)):  # bools too (skipped, spike_skipped): 1
                self.writer.add_scalar(tag(key), float(value), step)
                if tokens is not None:
                    self.writer.add_scalar(TOKENS_PREFIX + tag(key), float(value), int(tokens))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_scalars(directory: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of a TensorBoard directory, through TensorBoard's own reader
    (``EventAccumulator``; what the UI shows)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}

