"""The rooms of docs/DESIGN.md ("What each room may import"), held against the code: every import
of the project's own modules, at the top of a file or inside a function, read from the source (no
module is imported). A new arrow between rooms fails here until DESIGN.md and this table agree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO

ROOMS = ("pretrain", "evals", "data_pipeline")

# module prefix -> the project modules (prefixes) it may import besides its own room. Most specific first.
ALLOWED: list[tuple[str, tuple[str, ...]]] = [
    ("data_pipeline", ()),
    ("pretrain.model.gpt", ("pretrain.model.head",)),
    ("pretrain.model.head", ()),
    ("pretrain.model", ("pretrain.dist", "pretrain.checkpoint", "data_pipeline")),
    ("pretrain.checkpoint", ("pretrain.dist", "data_pipeline.integrity")),
    ("pretrain.training", ("pretrain.model", "pretrain.checkpoint", "pretrain.dist", "pretrain.config",
                           "pretrain.plan", "data_pipeline")),
    ("pretrain.dist", ()),
    # the console scripts: each command's main, imported when the command runs
    ("pretrain.cli", ("pretrain.dist", "pretrain.export", "pretrain.report", "pretrain.model.generate",
                      "pretrain.training.plot", "data_pipeline.prepare")),
    ("pretrain.config", ("pretrain.model", "pretrain.training.optim", "pretrain.values")),
    ("pretrain.values", ()),  # the bounded YAML loader and value quoting: every room's parses
    ("pretrain.plan", ("pretrain.config", "pretrain.checkpoint", "pretrain.model", "pretrain.training",
                       "data_pipeline")),
    # gpt2-eval: loads weights from any spec and ends like gpt2-train
    ("evals.run", ("evals", "pretrain.model", "pretrain.dist", "pretrain.checkpoint", "pretrain.cli", "pretrain.values",
                   "data_pipeline")),
    ("evals", ("pretrain.model", "pretrain.dist", "pretrain.values", "data_pipeline")),
    # gpt2-serve: generation's pieces under an engine and an HTTP app; ends like the other commands
    ("pretrain.serve", ("pretrain.model", "pretrain.cli", "pretrain.dist", "data_pipeline")),
    # the composing modules: both pretrain rooms and evals
    ("pretrain.train", ("pretrain", "evals", "data_pipeline")),
    ("pretrain.export", ("pretrain", "evals", "data_pipeline")),
    ("pretrain.card", ("pretrain", "evals", "data_pipeline")),
    ("pretrain.report", ("pretrain", "evals", "data_pipeline")),
    ("pretrain", ()),  # pretrain/__init__.py
]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def is_module(name: str) -> bool:
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def project_imports(path: Path, text: str | None = None) -> set[str]:
    """The project modules ``path`` (or ``text`` as its source) imports (``from pretrain import dist`` ->
    ``pretrain.dist``)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            subs = [f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}")]
            found.update(subs or [base])
    return {n for n in found if n.split(".")[0] in ROOMS}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def allowed_for(module: str) -> tuple[str, tuple[str, ...]]:
    return next((p, ok) for p, ok in ALLOWED if within(module, p))


def violations(path: Path, text: str | None = None) -> list[str]:
    """Imports of ``path`` outside its own room that its row of ALLOWED does not name."""
    me = module_name(path)
    room, ok = allowed_for(me)
    bad = []
    for target in sorted(project_imports(path, text)):
        own = within(target, room) and room != "pretrain"  # pretrain/__init__.py has no room of its own
        if not (own or target == "pretrain" or any(within(target, p) for p in ok)):
            bad.append(f"{me} imports {target}")
    return bad


def source_files() -> list[Path]:
    return [p for room in ROOMS for p in sorted((REPO / room).rglob("*.py"))]


def test_every_import_between_rooms_is_one_design_allows():
    files = source_files()
    assert len(files) > 50
    bad = [v for p in files for v in violations(p)]
    assert not bad, "imports DESIGN.md's room rules do not allow:\n" + "\n".join(bad)


@pytest.mark.parametrize("room,target", [
    ("data_pipeline/loader.py", "pretrain.dist"),
    ("pretrain/model/gpt.py", "pretrain.dist"),
    ("pretrain/training/trainer.py", "evals.val_loss"),
    ("evals/hellaswag.py", "pretrain.training.trainer"),
    ("pretrain/checkpoint/load.py", "pretrain.model.weights"),
    ("evals/val_loss.py", "pretrain.report"),
])
def test_a_forbidden_import_is_caught(room, target):
    """The check fails on an arrow DESIGN.md forbids (inside a function, as a lazy import would be)."""
    path = REPO / room
    text = path.read_text() + f"\n\ndef _lazy():\n    import {target}\n"
    assert not violations(path)
    assert any(target in v for v in violations(path, text)), violations(path, text)
