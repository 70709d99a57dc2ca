"""The run directory's layout (``train.run_dir``): the name of every file a run leaves in it.
The trainer writes them, ``gpt2-report``, the model card and ``gpt2-plot`` read them; each
through this package (``pretrain/rundir/``), so nothing else spells a name::

    RUN_DIR/
      .lock              the trainer's lock (lock.py)
      config.yaml        the resolved config of the latest start (records.py)
      environment.json   one entry per start or resume: device, torch, commit, MFU peak (records.py)
      metrics.jsonl      one JSON line per logged step (metrics_log.py)
      checkpoints/       step_XXXXXXXX/ (pretrain/checkpoint/)
      tensorboard/       the event files, with logging.tensorboard
      sample.txt         the demo's sample; eval.json: gpt2-eval --out; report.md; loss.png
      overwritten-*/     earlier runs moved aside by checkpoint.overwrite (lock.py)
"""

from __future__ import annotations

LOCK = ".lock"
CONFIG = "config.yaml"
ENVIRONMENT = "environment.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
SAMPLE = "sample.txt"
EVAL = "eval.json"
REPORT = "report.md"
PLOT = "loss.png"
ASIDE_PREFIX = "overwritten-"
