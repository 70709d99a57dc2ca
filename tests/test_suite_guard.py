"""The suite's own guard (tests/conftest.py): a test that leaves SIGINT ignored, handled elsewhere or
blocked fails, and the tests after it see SIGINT as the suite started with (a child started later
would inherit an ignored or blocked SIGINT, and a Ctrl-C sent to it would be lost)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from helpers import REPO, terminal_sigint

LEAKY = '''
import signal

import pytest


def test_ignores_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_after_it():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_blocks_sigint():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def test_after_that():
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.fixture(scope="module")
def leaky_module_fixture():
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    yield


def test_with_the_leaky_fixture(leaky_module_fixture):
    pass


def test_last():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
'''


def test_a_test_that_leaves_sigint_changed_fails_and_the_next_sees_it_put_back(tmp_path):
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-rE",
                        str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "1000"}, preexec_fn=terminal_sigint)
    tail = r.stdout.strip().splitlines()[-1]
    assert r.returncode == 1 and "5 passed" in tail and "3 errors" in tail, r.stdout[-3000:]
    errors = [line for line in r.stdout.splitlines() if line.startswith("ERROR ")]
    left = "this test left SIGINT's handler / blocked signals changed"
    assert any("test_ignores_sigint" in e and left in e and "SIG_IGN" in e for e in errors), errors
    assert any("test_blocks_sigint" in e and left in e and "SIGINT" in e for e in errors), errors
    assert any("test_with_the_leaky_fixture" in e and "changed before this test" in e for e in errors), errors
