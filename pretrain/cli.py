"""How a command of this project ends, all seven alike: its ``main()``'s exit code through
``pretrain.dist.exit_process`` (an exit gloo's threads cannot turn into an abort), and a Ctrl-C at
any moment ``main`` does not handle itself -- while torch is still being imported, while a model
loads, while a file is written -- as one line saying what was kept and how to go on, exit 130.
Standard library only at import time, so that import is covered too: the console scripts
(``pyproject.toml``) are the functions below, each importing its command's module when called.

    gpt2-train gpt2-eval gpt2-prepare gpt2-export gpt2-generate gpt2-plot gpt2-report
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command


def run(main: Callable[[], int], interrupted: str) -> NoReturn:
    """``main()``, then its exit code; ``interrupted`` is the line a Ctrl-C prints (exit 130)."""
    try:
        from pretrain.dist import exit_process

        rc = main()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    exit_process(rc)


def _command(module: str, argv: list[str] | None) -> Callable[[], int]:
    """The ``main(argv)`` of a command's module, imported only when the command runs (so a Ctrl-C
    during that import is handled by :func:`run` too)."""

    def main() -> int:
        import importlib

        return importlib.import_module(module).main(argv)

    return main


def prepare(argv: list[str] | None = None) -> NoReturn:
    """``gpt2-prepare`` (a prepare stopped mid-way says itself what it kept and the command that resumes)."""
    run(_command("data_pipeline.prepare", argv),
        "gpt2-prepare: interrupted (Ctrl-C) before any shard was written; rerun the same command")


def export(argv: list[str] | None = None) -> NoReturn:
    run(_command("pretrain.export", argv),
        "gpt2-export: interrupted (Ctrl-C); an export cut short is marked incomplete (complete: false) "
        "and is not loaded; rerun the same command with --overwrite")


def generate(argv: list[str] | None = None) -> NoReturn:
    """``gpt2-generate`` (a stop while sampling prints the samples already finished, then its line)."""
    run(_command("pretrain.inference.generate", argv),
        "gpt2-generate: interrupted (Ctrl-C) before any sample was finished")


def plot(argv: list[str] | None = None) -> NoReturn:
    run(_command("pretrain.plot", argv),
        "gpt2-plot: interrupted (Ctrl-C); the plot is written whole or not at all: rerun the same command")


def report(argv: list[str] | None = None) -> NoReturn:
    run(_command("pretrain.report", argv),
        "gpt2-report: interrupted (Ctrl-C); report.md is written whole or not at all: rerun the same command")
