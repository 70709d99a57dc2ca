"""The embedded default corpus: English text that ships with Python itself, no download.

``builtin:python-docs`` (``python -m data_pipeline.prepare builtin:python-docs OUT_DIR``) is
the corpus the demo trains on, chosen so that ``make demo`` works on a machine with no
internet. It is two parts of the CPython distribution that every Python install carries:

* **The language reference topics** (``pydoc_data.topics.topics``): the text ``help("if")``
  prints -- 79 topics of the Python Language Reference and Library Reference (statements,
  data model, operators, ...), about 465 K characters, ~139 K GPT-2 tokens on Python 3.11.
* **The standard library's docstrings**: for every ``.py`` file of the standard library
  (test suites excluded), its module, class and function docstrings in source order, one
  document per module, each docstring under its qualified name -- 635 modules, about 2.0 M
  characters, ~590 K GPT-2 tokens on Python 3.11 (read with :mod:`ast`, so no module is
  ever imported or executed).

Together: **729,583 GPT-2 tokens** (2.48 M characters, 714 documents) on CPython 3.11.7,
measured with ``data_pipeline.tokenizer``; the figure moves by a few percent between
Python versions. Small by pretraining
standards, but real, varied English prose about one subject, enough for a small GPT-2 to
fall far below the uniform loss (ln 50257 = 10.8) in a few CPU minutes.

License: both parts are Python documentation and source, distributed under the
**Python Software Foundation License Version 2** (https://docs.python.org/3/license.html),
which permits copying, modifying and redistributing them, with the PSF copyright notice.

Order: deterministic for a given Python installation. Documents are sorted by the sha256 of
their id (a fixed pseudo-random interleaving), so the validation split, which
``prepare`` takes from the first documents, mixes reference topics and docstrings of many
modules instead of being, say, all of ``asyncio``.

    >>> docs = list(iter_documents())
    >>> docs[0].keys()
    dict_keys(['text', 'id'])
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

NAME = "python-docs"
LICENSE = "Python Software Foundation License Version 2 (https://docs.python.org/3/license.html)"

# Directories of the standard library that hold test suites, demos or third-party code.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
# Docstrings shorter than this are mostly one-word stubs ("Return self.") that add noise.
_MIN_DOCSTRING_CHARS = 20


def stdlib_dir() -> Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _topic_documents() -> list[dict[str, str]]:
    from pydoc_data.topics import topics  # a plain dict literal; importing it runs nothing

    return [{"id": f"pydoc-topics/{name}", "text": text.strip() + "\n"} for name, text in topics.items()]


def _docstrings(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of a module and its classes and functions, in source order."""

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                    yield name, doc
                yield from visit(child, name + ".")

    doc = ast.get_docstring(tree)
    if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
        yield "", doc
    yield from visit(tree, "")


def _module_document(path: Path, root: Path) -> dict[str, str] | None:
    rel = path.relative_to(root).as_posix()
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None  # e.g. lib2to3's deliberately broken test data
    module = rel[: -len(".py")].replace("/", ".").removesuffix(".__init__")
    parts = []
    for name, doc in _docstrings(tree):
        parts.append(doc if not name else f"{module}.{name}\n\n{doc}")
    if not parts:
        return None
    return {"id": f"stdlib/{rel}", "text": "\n\n".join(parts).strip() + "\n"}


def _stdlib_documents(root: Path) -> list[dict[str, str]]:
    if not root.is_dir():
        return []  # an embedded/frozen Python without sources: the topics alone
    docs = []
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        doc = _module_document(path, root)
        if doc is not None:
            docs.append(doc)
    return docs


def iter_documents(stdlib_root: str | Path | None = None) -> Iterator[dict[str, str]]:
    """Yield ``{"text", "id"}`` documents of the embedded corpus, in a deterministic order.

    ``stdlib_root`` overrides where the standard library's sources are read from (tests).
    The whole corpus is built in memory (~2 MB of text, a few seconds of parsing) before the
    first document is yielded, because the order is a sort over all of them.
    """
    root = stdlib_dir() if stdlib_root is None else Path(stdlib_root)
    docs = _topic_documents() + _stdlib_documents(root)
    docs.sort(key=lambda d: hashlib.sha256(d["id"].encode()).hexdigest())
    yield from docs
