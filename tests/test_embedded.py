"""The embedded corpus (builtin:python-docs): deterministic, English, the documented size."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline import embedded
from data_pipeline.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def docs():
    return list(embedded.iter_documents())


def test_documents_are_dicts_with_unique_ids(docs):
    assert len(docs) > 79  # more than the reference topics alone: the stdlib docstrings are in
    assert all(set(d) == {"text", "id"} and isinstance(d["text"], str) and d["text"].strip() for d in docs)
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == len(ids)
    assert any(i.startswith("pydoc-topics/") for i in ids) and any(i.startswith("stdlib/") for i in ids)
    assert not any("/test/" in i or "/tests/" in i for i in ids)


def test_order_is_deterministic_across_processes_and_interleaved(docs):
    # Another interpreter, another hash seed: the same documents in the same order.
    code = ("import hashlib, json; from data_pipeline.embedded import iter_documents as it; "
            "print(json.dumps([[d['id'], hashlib.sha256(d['text'].encode()).hexdigest()] for d in it()]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    expected = [[d["id"], hashlib.sha256(d["text"].encode()).hexdigest()] for d in docs]
    assert json.loads(proc.stdout) == expected
    # The first documents (the validation split) mix both parts, not one module family.
    head = [d["id"].split("/")[0] for d in docs[:100]]
    assert "pydoc-topics" in head and "stdlib" in head


def test_text_is_english_prose(docs):
    text = " ".join(d["text"] for d in docs)
    words = re.findall(r"[A-Za-z]+", text.lower())
    common = {"the", "of", "and", "to", "is", "a", "in", "that", "for", "be", "this", "it", "an"}
    share = sum(w in common for w in words) / len(words)
    assert share > 0.15, share  # English prose: ~1 word in 5 is one of these
    topic = next(d for d in docs if d["id"] == "pydoc-topics/if")
    assert 'The "if" statement' in topic["text"]


def test_token_count_matches_the_docstring(docs):
    tok = get_tokenizer()
    n = sum(len(ids) for ids in tok.encode_batch([d["text"] for d in docs], num_threads=1))
    # Documented as ~730 K on CPython 3.11.7; other Python versions move it by a few percent.
    assert 500_000 < n < 1_000_000, n
    if sys.version_info[:2] == (3, 11):
        assert abs(n - 729_583) / 729_583 < 0.05, n


def test_modules_are_parsed_not_imported(tmp_path):
    # A fake stdlib whose module would fail loudly if it were ever executed.
    (tmp_path / "boom.py").write_text('"""Module docstring of boom, long enough."""\nraise SystemExit("imported!")\n'
                                      'def f():\n    """A function docstring that is long enough."""\n')
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text('"""A test module docstring that is skipped."""\n')
    (tmp_path / "broken.py").write_text('"""Docstring."""\ndef (:\n')
    docs = list(embedded.iter_documents(stdlib_root=tmp_path))
    stdlib = [d for d in docs if d["id"].startswith("stdlib/")]
    assert [d["id"] for d in stdlib] == ["stdlib/boom.py"]
    assert "Module docstring of boom" in stdlib[0]["text"] and "boom.f\n\nA function docstring" in stdlib[0]["text"]


def test_missing_stdlib_sources_fall_back_to_the_topics(tmp_path):
    docs = list(embedded.iter_documents(stdlib_root=tmp_path / "absent"))
    assert docs and all(d["id"].startswith("pydoc-topics/") for d in docs)


def test_docstring_states_size_and_license():
    doc = embedded.__doc__
    assert "Python Software Foundation License" in doc and "729,583" in doc


def test_data_pipeline_imports_nothing_of_the_project():
    src = Path(embedded.__file__).read_text()
    assert not re.search(r"^\s*(from|import)\s+(pretrain|evals)\b", src, re.M)
