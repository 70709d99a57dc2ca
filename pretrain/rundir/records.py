"""The run's records in its directory: ``config.yaml`` (the resolved config of the last start) and
``environment.json`` (one entry per start or resume, with the step it starts at and the resolved
config it ran with), written by rank 0 at each start and read by the run report and the model
card; ``eval.json`` (gpt2-eval's ``--out``) is read here too."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pretrain.rundir.layout import CONFIG, ENVIRONMENT, EVAL


def read_json(path: Path) -> Any:
    """A JSON file's content; None when it is missing or unreadable (a record is a nicety)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def config_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CONFIG


def write_config(run_dir: str | os.PathLike, text: str) -> None:
    config_path(run_dir).write_text(text)


class RecordError(ValueError):
    """A run-directory record that exists but cannot be read: one line naming the file."""


def read_config(run_dir: str | os.PathLike) -> dict | None:
    """The run's config as plain data, None when it has none; RecordError (one line) when it
    does not parse (read through the one bounded YAML loader, ``pretrain.values``)."""
    from pretrain.values import MAX_YAML_BYTES, BoundError, load_yaml, read_bounded

    p = config_path(run_dir)
    if not p.is_file():
        return None
    try:
        data = load_yaml(read_bounded(p, MAX_YAML_BYTES, "config file"))
    except BoundError as e:
        said = str(e) if str(e).startswith(str(p)) else f"{p}{' ' if str(e).startswith('(') else ': '}{e}"
        raise RecordError(said) from None
    except OSError as e:
        raise RecordError(f"{p}: cannot read it ({e.strerror or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecordError(f"{p}: a config is a mapping of sections, got {type(data).__name__}")
    return data


def record_environment(run_dir: str | os.PathLike, env: dict, resume_step: int | None) -> None:
    """Append this start's environment to ``environment.json``: a resume (``resume_step``) keeps
    the entries of the starts before that step, a fresh start (None) replaces the file."""
    path = Path(run_dir) / ENVIRONMENT
    starts = []
    if resume_step is not None and path.is_file():
        try:
            starts = [s for s in json.loads(path.read_text()) if s.get("start_step", 0) < resume_step]
        except (json.JSONDecodeError, AttributeError, TypeError):
            starts = []
    starts.append({"start_step": resume_step if resume_step is not None else 0, **env})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(starts, indent=1) + "\n")
    tmp.replace(path)


def read_environment(run_dir: str | os.PathLike) -> list[dict]:
    """Every start's environment entry; [] for a run without the record."""
    return read_json(Path(run_dir) / ENVIRONMENT) or []


def read_eval(run_dir: str | os.PathLike) -> Any:
    """``eval.json`` (gpt2-eval's final evaluation), None when there is none."""
    return read_json(Path(run_dir) / EVAL)
