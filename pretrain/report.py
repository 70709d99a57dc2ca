"""The run report: one page, ``RUN_DIR/report.md``, that says what a run was and what it gave.

    gpt2-report runs/gpt2-124m                 # on demand (any run directory, finished or not)
    pretrain/train.py                          # writes it itself when a run finishes (rank 0)

Read from what the run left in its directory, nothing else (``pretrain/rundir/``): the environment
record (device, torch, commit, the MFU peak and the config of every start), the config (shown as
its differences from the defaults; each start's value where a resume changed it), the metrics log
(throughput, MFU, wall time, the in-training evaluations, the sample), gpt2-eval's final
evaluation when ``gpt2-eval --out RUN_DIR/eval.json`` wrote one, and the loss plot (drawn by ``gpt2-plot`` if it is missing or older than the metrics).
Evaluation figures are set beside OpenAI GPT-2 124M's published ones where task and metric match
(``evals/tasks.py`` ``REFERENCE``; sources in evals/README.md).

This module composes the training side and ``evals`` (like ``pretrain/train.py``); the trainer
never imports it.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from data_pipeline.arguments import Parser
from pretrain.rundir.layout import CONFIG, ENVIRONMENT, EVAL, METRICS, PLOT, REPORT, SAMPLE
from pretrain.rundir.metrics_log import metrics_path
from pretrain.rundir.records import RecordError, read_config, read_environment, read_eval


class ReportError(ValueError):
    """A directory the report cannot be made from: one line naming it and the fix."""


def _final_results(run_dir: Path) -> dict:
    """``eval.json``'s results (gpt2-eval --out RUN_DIR/eval.json), or {} without one; a file that
    is not gpt2-eval's is refused in one line (a report must not leave its figures out silently)."""
    path = Path(run_dir) / EVAL
    if not path.is_file():
        return {}
    data = read_eval(run_dir)
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not all(isinstance(k, str) for k in results):
        what = "not valid JSON" if data is None else "no 'results' mapping of metric names to numbers"
        raise ReportError(f"{path}: {what} (not gpt2-eval's output); write it again with gpt2-eval --model "
                          f"{run_dir} ... --out {path}, or remove it")
    return {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def starts_upto(envs: list, upto: int | None = None) -> list[dict]:
    """The environment record's entries (one per start); ``upto``: only the starts that trained
    the steps up to that one (a checkpoint's), not those that resumed after it."""
    return [e for e in envs if isinstance(e, dict) and isinstance(e.get("start_step"), int)
            and (upto is None or e["start_step"] < upto or e["start_step"] == 0)]


def settings_by_start(envs: list, recorded: dict | None) -> list[tuple[int, dict]]:
    """(first step, config) of each start of the run: the resolved config the start recorded in the
    environment record (``rundir.records``), or, for a start without one (a run older than that
    record), ``config.yaml``'s (``recorded``: the last start's)."""
    out = [(e["start_step"], e["config"] if isinstance(e.get("config"), dict) else recorded or {})
           for e in starts_upto(envs)]
    return out or [(0, recorded or {})]


def changes(values: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """(first step, value) at each start whose value differs from the start before."""
    return [(s, v) for i, (s, v) in enumerate(values) if i == 0 or values[i - 1][1] != v]


def config_differences(run_dir: Path) -> list[tuple[str, Any, list[tuple[int, Any]]]]:
    """(key, default, [(first step, value), ...]) for every config key some start of the run set
    apart from the default: one value, or the value each start changed it to (a resume with other
    overrides). Keys of a known section that this version no longer has (a key an older version
    recorded) are left out; a section no version has, or a value the config refuses, is refused in
    one line."""
    from pretrain.config import Config, ConfigError, from_dict

    fix = f"fix or restore {Path(run_dir) / CONFIG} (a run's own config.yaml is written by gpt2-train)"
    try:
        recorded = read_config(run_dir)
    except RecordError as e:
        raise ReportError(f"{e}; {fix}") from None
    if recorded is None:
        return []
    default = Config().to_dict()

    def resolved(config: dict) -> dict:
        extra = [s for s in config if s not in default]
        if extra:
            raise ReportError(f"{Path(run_dir) / CONFIG}: section {extra[0]!r} is not a gpt2-train config section "
                              f"(sections: {', '.join(default)}); {fix}")
        known = {section: {k: v for k, v in values.items() if k in default.get(section, {})}
                 for section, values in config.items() if isinstance(values, dict)}
        try:
            return from_dict(known).to_dict()
        except ConfigError as e:
            raise ReportError(f"{' '.join(str(e).split())[:240]}; {fix}") from None

    resolved(recorded)  # config.yaml is checked even where every start recorded its own config
    ran = [(step, resolved(config)) for step, config in settings_by_start(read_environment(run_dir), recorded)]
    rows = []
    for section, values in default.items():
        for k, d in values.items():
            seen = changes([(step, c[section][k]) for step, c in ran])
            if any(v != d for _, v in seen):
                rows.append((f"{section}.{k}", d, seen))
    return rows


def describe_changes(seen: list[tuple[int, Any]], fmt: Callable[[Any], str] = str) -> str:
    """One value, or each start's (``changes``): '0.0030 from step 0; 0.0010 from step 4'."""
    if len(seen) == 1:
        return fmt(seen[0][1])
    return "; ".join(f"{fmt(v)} from step {s}" for s, v in seen)


OPENAI_GPT2 = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # legacy hub names, now openai-community/<name>


def init_record(environment: list, config: dict | None = None) -> dict | None:
    """What the environment record (``rundir.records``) holds of the weights the run started from (``model.init_from``,
    written by the fresh start: ``pretrain.model.weights.provenance``), or None (from scratch).
    Without that record (a run older than it), the run's ``config.yaml`` ``model.init_from``."""
    first = next((e for e in environment if isinstance(e, dict) and e.get("start_step") == 0), None)
    record = (first or {}).get("init_from")
    if isinstance(record, dict) and record.get("spec"):
        return record
    spec = ((config or {}).get("model") or {}).get("init_from") if isinstance(config, dict) else None
    if first is None and isinstance(spec, str) and spec:
        return {"spec": spec, "kind": None, "path": None}  # what kind of source it was is not recorded
    return None


def base_model(record: dict | None) -> str | None:
    """The Hub's ``base_model`` id of the starting weights: only a hub model has one."""
    if record is None or record.get("kind") != "hub":
        return None
    spec = str(record["spec"])
    return f"openai-community/{spec}" if spec in OPENAI_GPT2 else spec


def starting_weights(record: dict | None) -> str:
    """One sentence of where the weights began: from scratch, or the ``model.init_from`` source
    (its name or path, and the sha256 its export record holds)."""
    if record is None:
        return "trained from scratch (random initialization)"
    kind = {"hub": "the Hugging Face Hub model", "hf": "the Hugging Face directory",
            "checkpoint": "the gpt2-pretrain checkpoint"}.get(record.get("kind"), "the weights")
    where = record.get("path") if record.get("kind") != "hub" and record.get("path") else record["spec"]
    digests = record.get("sha256") or {}
    said = "; ".join(f"{n} sha256 {d}" for n, d in digests.items()) if isinstance(digests, dict) else ""
    said = f" ({said}, from its gpt2_export.json record)" if said else ""
    return f"fine-tuned from {kind} `{where}`{said} (model.init_from); the steps and tokens below are the fine-tune's"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return "`null`" if v is None else f"`{v}`"


def throughput(records: list[dict]) -> dict[str, Any]:
    """Median tokens/s and MFU over the logged steps after the first tenth (warm-up, first
    compile), and the wall time from the first to the last logged step."""
    steps = [r for r in records if isinstance(r.get("tokens_per_s"), (int, float))]
    steady = steps[len(steps) // 10:] or steps
    tps = [r["tokens_per_s"] for r in steady]
    mfus = [r["mfu"] for r in steady if isinstance(r.get("mfu"), (int, float))]
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    first_dt = (records[0].get("dt_ms") or 0) / 1000 if records else 0
    return {
        "tokens_per_s": statistics.median(tps) if tps else None,
        "mfu": statistics.median(mfus) if mfus else None,
        "wall_s": (times[-1] - times[0] + first_dt) if times else None,
        "steps": records[-1]["step"] if records else 0,
        "tokens": records[-1].get("tokens_seen") if records else None,
    }


def duration(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"


def evaluation_rows(records: list[dict], final: dict[str, float]) -> list[tuple[str, str, str, str]]:
    """(metric, last in-training value @ step, gpt2-eval value, GPT-2 124M reference) per eval key."""
    from evals.tasks import REFERENCE

    last: dict[str, tuple[int, float]] = {}
    for r in records:
        for k, v in r.items():
            if "/" in k and not k.startswith(("time/", "sample/")) and isinstance(v, (int, float)):
                last[k] = (r["step"], float(v))
    keys = [k for k in dict.fromkeys([*last, *final]) if not k.endswith(("_stderr", "num_examples", "/tokens"))]
    rows = []
    for k in keys:
        parts = k.split("/")
        task, metric = (parts[1], parts[2]) if parts[0] == "tasks" and len(parts) == 3 else (parts[0], parts[-1])
        ref = REFERENCE.get((task, metric, 0))
        rows.append((f"`{k}`", f"{last[k][1]:.4f} @ {last[k][0]}" if k in last else "",
                     f"{final[k]:.4f}" if k in final else "", f"{ref[0]:.4f} ({ref[1]})" if ref else ""))
    return rows


def core_notes(keys: list[str]) -> list[str]:
    """Under an evaluation table holding CORE figures: OpenAI GPT-2's CORE at each size (evals/tasks.py),
    and what core/mean_centered is (a per-task limit: not CORE); bits per byte said in words."""
    from evals.tasks import core_reference_line

    keys = [k.strip("`") for k in keys]
    out = []
    if any(k.startswith("core/") for k in keys):
        out.append(f"- {core_reference_line()}.")
    if "core/mean_centered" in keys:
        out.append("- `core/mean_centered`: the mean centred accuracy over the first N items of each task "
                   "(eval.core_limit / --limit): not CORE, which scores every item.")
    if "val/bpb" in keys:
        out.append("- `val/bpb`: validation bits per byte (nats / ln 2 / UTF-8 bytes of the text tokens), "
                   "comparable across tokenizers.")
    return [""] + out if out else []


def _plot(run_dir: Path) -> Path | None:
    from pretrain import plot

    png, metrics = run_dir / PLOT, metrics_path(run_dir)
    if not png.is_file() or png.stat().st_mtime < metrics.stat().st_mtime:
        plot.plot_runs(plot.load_runs([run_dir]), png)
    return png


def _sample(run_dir: Path, records: list[dict]) -> str | None:
    if (run_dir / SAMPLE).is_file():
        return (run_dir / SAMPLE).read_text(encoding="utf-8", errors="replace").strip()
    texts = [(r["step"], r["sample/text"]) for r in records if isinstance(r.get("sample/text"), str)]
    return f"(step {texts[-1][0]}) {texts[-1][1]}" if texts else None


def render(run_dir: Path) -> str:
    """The report's Markdown for ``run_dir`` (see the module docstring for what it reads)."""
    from pretrain.plot import PlotError, load_runs

    try:
        records = load_runs([run_dir])[0].records
    except PlotError as e:
        raise ReportError(str(e)) from None
    envs = read_environment(run_dir)
    final = _final_results(run_dir)
    t = throughput(records)
    last_loss = next((r["loss"] for r in reversed(records) if isinstance(r.get("loss"), (int, float))), None)
    lines = [f"# Run report: {run_dir.name}", "",
             f"{t['steps']} steps, {t['tokens'] or 0:,} tokens, wall time {duration(t['wall_s'])}; final train loss "
             f"{_fmt(last_loss)}. Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by gpt2-report from "
             f"`{run_dir}`.", "", f"Weights: {starting_weights(init_record(envs if isinstance(envs, list) else []))}.",
             "", "## Environment", ""]
    if envs:
        lines += ["| from step | device | world | mode | dtype | compile | torch | commit | host |", "|---" * 9 + "|"]
        lines += [f"| {e.get('start_step')} | {e.get('device_name') or e.get('device')} ({e.get('device')}) | "
                  f"{e.get('world_size')} | {e.get('mode')} | {e.get('dtype')} | {e.get('compile')} | {e.get('torch')} | "
                  f"`{e.get('commit')}` | {e.get('host')} |" for e in envs]
    else:
        lines.append(f"No {ENVIRONMENT} (a run started before the report existed).")
    diffs = config_differences(run_dir)
    lines += ["", "## Configuration: differences from the defaults", "",
              "| key | default | this run |", "|---|---|---|"] + [f"| `{k}` | {_fmt(d)} | {describe_changes(v, _fmt)} |"
                                                                 for k, d, v in diffs]
    peak = envs[-1].get("peak_source") if envs else f"unknown (no {ENVIRONMENT})"
    mfu = f"{100 * t['mfu']:.1f}%" if t["mfu"] is not None else "n/a"
    tps = f"{t['tokens_per_s']:,.0f}" if t["tokens_per_s"] is not None else "n/a"
    lines += ["", "## Throughput", "",
              f"- tokens/s (median over the logged steps after the first tenth): {tps}",
              f"- MFU (median): {mfu}; peak used: {peak}",
              f"- wall time, first to last logged step: {duration(t['wall_s'])}"
              + (f" (over {len(envs)} starts: includes the time between a stop and its resume)" if len(envs) > 1 else "")]
    rows = evaluation_rows(records, final)
    lines += ["", "## Evaluations", ""]
    if rows:
        lines += ["| metric | in training (last, @ step) | gpt2-eval (eval.json) | OpenAI GPT-2 124M (0-shot, source) |",
                  "|---|---|---|---|"] + [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    else:
        lines.append("No evaluations logged (eval.interval=0 and no eval.json).")
    lines += core_notes([k for k, *_ in rows])
    png = _plot(run_dir)
    lines += ["", "## Loss curves", "", f"![loss curves]({png.name})"]
    sample = _sample(run_dir, records)
    lines += ["", "## Sample", "", "```text", sample if sample else "(no sample logged)", "```", ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """Render and write ``RUN_DIR/report.md`` (atomically); returns its path."""
    run_dir = Path(run_dir)
    text = render(run_dir)
    out = run_dir / REPORT
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="gpt2-report", description="Write RUN_DIR/report.md: environment, config "
                                "differences, tokens/s and MFU, wall time, evaluations against GPT-2 124M, plot, sample.")
    p.add_argument("run_dir", metavar="RUN_DIR", help=f"a run directory (train.run_dir, holding {METRICS})")
    args = p.parse_args(argv)
    try:
        out = write_report(args.run_dir)
    except (ReportError, OSError) as e:
        print(f"gpt2-report: error: {e}", file=sys.stderr)
        return 2
    print(f"gpt2-report: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
