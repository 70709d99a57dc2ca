"""Plot training runs from their metrics logs: loss, learning rate, throughput, HellaSwag.

    python -m pretrain.plot runs/smoke_cpu                      # -> runs/smoke_cpu/loss.png
    gpt2-plot runs/a runs/b --out compare.png                   # several runs overlaid

One PNG, a grid of panels: rows are train/val loss, learning rate, tokens/s and HellaSwag
accuracy, and, when a run logged lm-evaluation-harness tasks (``eval.tasks``: ``tasks/<task>/<metric>``),
their scores and their perplexity-type metrics (log scale); the left column plots them against optimizer steps, the right against tokens seen.
Each run has one colour (legend = the run directory's name); train loss is a solid line, val
loss dashed with dots, HellaSwag acc_norm solid and acc dotted. A panel no run has data for
says "no data". Matplotlib's Agg backend: no display needed.

The metrics log and how it is read (a torn last line skipped, a step's last line wins) are
``pretrain/rundir/metrics_log.py``'s.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.arguments import Parser
from pretrain.rundir.layout import METRICS, PLOT
from pretrain.rundir.metrics_log import MetricsLogError, is_number, metrics_path, read_metrics

UNIFORM_LOSS = math.log(50257)  # the loss of a model that knows nothing about GPT-2's vocabulary


class PlotError(ValueError):
    """A run that cannot be plotted; the message is one line naming the path and the fix."""


@dataclass
class Run:
    name: str
    path: Path
    records: list[dict[str, Any]]

    def series(self, x_key: str, y_key: str) -> tuple[list[float], list[float]]:
        """(x, y) of the records that have a finite number for both keys."""
        xs, ys = [], []
        for r in self.records:
            x, y = r.get(x_key), r.get(y_key)
            if is_number(x) and is_number(y):
                xs.append(float(x))
                ys.append(float(y))
        return xs, ys


def load_runs(runs: Sequence[str | Path]) -> list[Run]:
    """Read every run (errors name the path); legend names are the run directories' names,
    made unique with their parents when two runs share a name."""
    try:
        paths = [metrics_path(r) for r in runs]
        records_of = [read_metrics(p) for p in paths]
    except MetricsLogError as e:
        raise PlotError(str(e)) from None
    names = [p.parent.name or str(p.parent) for p in paths]
    out = []
    for p, name, records in zip(paths, names, records_of):
        if names.count(name) > 1:
            name = str(p.parent)
        if not records:
            raise PlotError(f"{p} holds no metrics yet: plot it after the first logged step")
        out.append(Run(name=name, path=p, records=records))
    return out


# (row title, y label, [(metric key, line style, marker, label suffix)])
PANELS: list[tuple[str, str, list[tuple[str, str, str | None, str]]]] = [
    ("Loss", "cross-entropy (nats/token)", [("loss", "-", None, "train"), ("val/loss", "--", "o", "val")]),
    ("Learning rate", "lr", [("lr", "-", None, "")]),
    ("Throughput", "tokens/s", [("tokens_per_s", "-", None, "")]),
    ("HellaSwag", "accuracy", [("hellaswag/acc_norm", "-", "o", "acc_norm"), ("hellaswag/acc", ":", "s", "acc")]),
]
X_AXES = [("step", "optimizer step"), ("tokens_seen", "tokens seen")]
TASK_PREFIX = "tasks/"  # lm-evaluation-harness figures (eval.tasks): tasks/<task>/<metric>
_LOWER_IS_BETTER = ("perplexity", "bits_per_byte")


def task_panels(runs: Sequence[Run]) -> list[tuple[str, str, list[tuple[str, str, str | None, str]]]]:
    """Rows for the harness tasks the runs logged (none when no run has any): scores (accuracies,
    exact match) in one, perplexity-type metrics (log scale) in another; one line per task and metric."""
    keys = sorted({k for r in runs for rec in r.records for k in rec
                   if k.startswith(TASK_PREFIX) and not k.endswith("_stderr")})
    styles = ["-", "--", ":", "-."]
    scores = [k for k in keys if not any(w in k for w in _LOWER_IS_BETTER)]
    ppl = [k for k in keys if any(w in k for w in _LOWER_IS_BETTER)]
    rows = []
    for title, ylabel, group in (("Harness tasks", "score", scores), ("Harness tasks (lower is better)",
                                                                      "perplexity / bits per byte", ppl)):
        if group:
            rows.append((title, ylabel, [(k, styles[i % len(styles)], "o", k[len(TASK_PREFIX):])
                                         for i, k in enumerate(group)]))
    return rows


def plot_runs(runs: Sequence[Run], out: str | Path) -> Path:
    """Draw every run into one PNG at ``out`` (parent directories created); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = PANELS + task_panels(runs)
    fig, axes = plt.subplots(len(panels), len(X_AXES), figsize=(13, 3.2 * len(panels)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (title, ylabel, keys) in enumerate(panels):
        for col, (x_key, x_label) in enumerate(X_AXES):
            ax = axes[row][col]
            drawn = 0
            for i, run in enumerate(runs):
                color = colors[i % len(colors)]
                for key, style, marker, suffix in keys:
                    xs, ys = run.series(x_key, key)
                    if not xs:
                        continue
                    named = len(keys) > 1 or key.startswith(TASK_PREFIX)  # a task row: always say which
                    label = f"{run.name} {suffix}".strip() if named else run.name
                    ax.plot(xs, ys, linestyle=style, marker=marker, markersize=3, color=color,
                            label=label, linewidth=1.2)
                    drawn += 1
            ax.set_title(f"{title} vs {x_label}", fontsize=10)
            ax.set_xlabel(x_label)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if not drawn:
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center",
                        fontsize=14, color="gray")
                continue
            if title == "Loss":
                ax.axhline(UNIFORM_LOSS, color="gray", linewidth=0.8, linestyle=":")
                ax.text(0.99, UNIFORM_LOSS, "uniform ln 50257", transform=ax.get_yaxis_transform(),
                        ha="right", va="bottom", fontsize=7, color="gray")
            if title == "HellaSwag":
                ax.axhline(0.25, color="gray", linewidth=0.8, linestyle=":")
                ax.text(0.99, 0.25, "chance", transform=ax.get_yaxis_transform(),
                        ha="right", va="bottom", fontsize=7, color="gray")
            if title == "Learning rate":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            if title == "Harness tasks (lower is better)":
                ax.set_yscale("log")
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(", ".join(r.name for r in runs), fontsize=11)
    fig.tight_layout()
    out = Path(out)
    fmt = out.suffix.lstrip(".").lower() or "png"
    kinds = fig.canvas.get_supported_filetypes()
    if fmt not in kinds:  # before anything is written
        plt.close(fig)
        raise PlotError(f"--out {out}: matplotlib cannot write .{fmt} images; end the name with one of "
                        f"{', '.join('.' + f for f in sorted(kinds))}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")  # written whole or not at all (a Ctrl-C, a full disk)
    try:
        fig.savefig(tmp, dpi=100, format=fmt)
        tmp.replace(out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="gpt2-plot",
        description="Plot train/val loss, learning rate, tokens/s and HellaSwag of one or more runs "
                    f"(their {METRICS}) against steps and tokens, into one PNG.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help=f"run directories (train.run_dir, holding {METRICS}) or {METRICS} files; "
                        "several are overlaid")
    p.add_argument("--out", default=None,
                   help="PNG to write (default: RUN_DIR/loss.png for one run, ./loss.png for several)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = load_runs(args.runs)
        out = Path(args.out or (runs[0].path.parent / PLOT if len(runs) == 1 else PLOT))
        where = out.parent
        while not where.exists() and where != where.parent:
            where = where.parent
        if not where.is_dir():  # before matplotlib is imported and the figure drawn
            raise PlotError(f"--out {out}: {where} is not a directory; choose another --out")
        if out.is_dir():
            raise PlotError(f"--out {out}: is a directory; pass an image path such as {out / PLOT}")
        path = plot_runs(runs, out)
    except (PlotError, OSError) as e:
        print(f"gpt2-plot: error: {e}", file=sys.stderr)
        return 2
    steps = ", ".join(f"{r.name}: {len(r.records)} steps" for r in runs)
    print(f"gpt2-plot: wrote {path} ({steps})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
