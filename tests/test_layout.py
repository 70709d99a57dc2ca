"""The rooms of docs/DESIGN.md ("What each room may import"), held against the code: every import
of the project's own modules, at the top of a file or inside a function, read from the source (no
module is imported). A new arrow between rooms fails here until DESIGN.md and this table agree."""

from __future__ import annotations

import ast
import re
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
    ("pretrain.inference.cpu", ()),  # the CPU backend: torch only
    ("pretrain.inference", ("pretrain.model", "pretrain.dist", "data_pipeline")),
    ("pretrain.checkpoint", ("pretrain.dist", "data_pipeline.integrity")),
    ("pretrain.rundir", ("pretrain.values",)),
    ("pretrain.schedule", ()),
    ("pretrain.training", ("pretrain.model", "pretrain.checkpoint", "pretrain.dist", "pretrain.config",
                           "pretrain.plan", "pretrain.rundir", "pretrain.schedule", "data_pipeline")),
    ("pretrain.dist", ()),
    # the console scripts: each command's main, imported when the command runs
    ("pretrain.cli", ("pretrain.dist", "pretrain.export", "pretrain.report", "pretrain.inference.generate",
                      "pretrain.plot", "data_pipeline.prepare")),
    ("pretrain.config", ("pretrain.model", "pretrain.schedule", "pretrain.values")),
    ("pretrain.values", ()),  # the bounded YAML loader and value quoting: every room's parses
    ("pretrain.plan", ("pretrain.config", "pretrain.checkpoint", "pretrain.model", "pretrain.training",
                       "pretrain.rundir", "pretrain.schedule", "data_pipeline")),
    ("pretrain.plot", ("pretrain.rundir", "data_pipeline")),  # gpt2-plot
    # gpt2-eval: loads weights from any spec and ends like gpt2-train
    ("evals.run", ("evals", "pretrain.model", "pretrain.inference", "pretrain.dist", "pretrain.checkpoint",
                   "pretrain.cli", "pretrain.values", "data_pipeline")),
    ("evals", ("pretrain.model", "pretrain.inference", "pretrain.dist", "pretrain.values", "data_pipeline")),
    # gpt2-serve: generation's pieces under an engine and an HTTP app; ends like the other commands
    ("pretrain.serve", ("pretrain.model", "pretrain.inference", "pretrain.cli", "pretrain.dist", "data_pipeline")),
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


def project_imports(path: Path, text: str | None = None, typing: bool = True) -> set[str]:
    """The project modules ``path`` (or ``text`` as its source) imports (``from pretrain import dist`` ->
    ``pretrain.dist``); ``typing=False`` leaves out the imports under ``if TYPE_CHECKING:`` (types
    only: no arrow at run time)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text() if text is None else text, str(path))
    typing_only = set() if typing else {
        id(n) for block in ast.walk(tree)
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
        for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
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


def folder(module: str) -> str:
    """The folder of pretrain/ a module is part of (``pretrain.training.build`` -> ``training``); a
    module at the top of pretrain/ is a folder of its own (``pretrain.plan`` -> ``plan``)."""
    return module.split(".")[1]


def folder_cycle(texts: dict[Path, str] | None = None) -> list[str]:
    """A cycle of run-time imports between the folders of pretrain/ (``training -> plan -> training``),
    or [] when there is none; ``texts`` stands in for some files' source."""
    texts = texts or {}
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "pretrain").rglob("*.py")):
        if path.name == "__init__.py" and path.parent.name == "pretrain":
            continue
        a = folder(module_name(path))
        for target in project_imports(path, texts.get(path), typing=False):
            if target.startswith("pretrain.") and folder(target) != a:
                graph.setdefault(a, set()).add(folder(target))
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(path: list[str]) -> list[str]:  # depth first from path[-1]
        state[path[-1]] = 1
        for m in sorted(graph.get(path[-1], ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(path + [m])):
                return found
        state[path[-1]] = 2
        return []

    for n in sorted(graph):
        if n not in state and (found := visit([n])):
            return found
    return []


def test_no_import_cycle_between_folders_of_pretrain():
    """Each folder of pretrain/ (model, checkpoint, rundir, training, and each module at its top:
    config, plan, schedule, ...) imports only folders that never import it back; a part that only
    needs another's type imports it under ``if TYPE_CHECKING:``."""
    assert folder_cycle() == []


def test_an_import_cycle_between_folders_is_caught():
    build = REPO / "pretrain" / "training" / "build.py"
    text = build.read_text().replace("if TYPE_CHECKING:\n    from pretrain.plan import RunPlan",
                                     "from pretrain.plan import RunPlan")
    assert text != build.read_text()
    assert " -> ".join(folder_cycle({build: text})) in ("plan -> training -> plan", "training -> plan -> training")


@pytest.mark.parametrize("room,target", [
    ("data_pipeline/loader.py", "pretrain.dist"),
    ("pretrain/model/gpt.py", "pretrain.dist"),
    ("pretrain/model/gpt.py", "pretrain.inference.cache"),  # the model declares the cache protocol; inference implements it
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


def test_private_cpu_ops_live_in_the_cpu_backend_only():
    """torch's private CPU ops (oneDNN's packed linear, the int8 kernel) are called from
    pretrain/inference/cpu.py alone, where each is guarded with a portable fallback."""
    pattern = ("torch.ops.mkldnn", "_weight_int8pack_mm")
    users = sorted(str(p.relative_to(REPO)) for room in ("pretrain", "evals") for p in (REPO / room).rglob("*.py")
                   if any(s in p.read_text() for s in pattern))
    assert users == ["pretrain/inference/cpu.py"], users


def test_importing_every_module_registers_no_op():
    """No work at import time: importing every module of pretrain, evals and data_pipeline (in a fresh
    interpreter) registers no torch op; the CPU backend registers its custom op when it first packs a weight."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, torch\n"
        "before = set(torch._C._dispatch_get_all_op_names())\n"
        "for room in ('pretrain', 'evals', 'data_pipeline'):\n"
        "    pkg = importlib.import_module(room)\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, room + '.'):\n"
        "        if not m.name.endswith('__main__'):\n"
        "            importlib.import_module(m.name)\n"
        "new = sorted(set(torch._C._dispatch_get_all_op_names()) - before)\n"
        "from pretrain.inference.cpu import _compiled_op\n"
        "_compiled_op()\n"
        "print(new, 'pretrain::onednn_linear' in torch._C._dispatch_get_all_op_names())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == ["[]", "True"], r.stdout  # nothing at import; the probe sees a registration


# the environment variables only tests set (tests/faults.py), and the spellings a test hook's would take
TEST_ONLY_ENV = re.compile(r"GPT2_TEST|_TEST_|TEST_SLEEP|PRETRAIN_FAULT")
PRODUCT_DIRS = (*ROOMS, "launch")


def env_hook_mentions(texts: dict[Path, str] | None = None) -> list[str]:
    """``file:line`` of every mention of a test-only environment variable in the product's files
    (its modules, launchers, configs and docs; ``texts`` stands in for them)."""
    files = texts or {p: p.read_text(errors="replace") for d in PRODUCT_DIRS for p in sorted((REPO / d).rglob("*"))
                      if p.is_file() and "__pycache__" not in p.parts}
    return [f"{p.relative_to(REPO)}:{i}" for p, text in files.items()
            for i, line in enumerate(text.splitlines(), 1) if TEST_ONLY_ENV.search(line)]


def test_no_product_file_reads_a_test_only_environment_variable():
    """Faults are injected from the tests (tests/faults.py, through tests/fault_site on a child's
    PYTHONPATH): no module or launcher of the product reads a test-only environment variable."""
    import faults

    assert all(TEST_ONLY_ENV.search(v) for v in (faults.FAULT_ENV, faults.HANG_ENV, faults.PREPARE_SLEEP_ENV))
    assert env_hook_mentions() == []
    job = REPO / "data_pipeline" / "job.py"
    hooked = job.read_text() + '\n_SLOW = float(os.environ.get("GPT2_TEST_PREPARE_SLEEP", "0"))\n'
    assert env_hook_mentions({job: hooked}) == [f"data_pipeline/job.py:{len(hooked.splitlines())}"]
