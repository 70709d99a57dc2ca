"""Shared test setup: CPU, one thread per process (the CI machine has 2 cores), no network."""

import os
import signal

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def _sigint_state() -> tuple[object, frozenset]:
    """SIGINT's handler and this thread's blocked signals: what a child started next inherits (an
    ignored or blocked SIGINT stays so in it, and a Ctrl-C sent to it is lost)."""
    return signal.getsignal(signal.SIGINT), frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, []))


_SIGINT_AT_START: list[tuple[object, frozenset]] = []  # this process's, as its first test found it


def _put_back(state: tuple[object, frozenset]) -> None:
    if state[0] is not None:  # None: a handler not set from Python (nothing to put back)
        signal.signal(signal.SIGINT, state[0])
    signal.pthread_sigmask(signal.SIG_SETMASK, state[1])


@pytest.fixture(autouse=True)
def _sigint_left_as_found():
    """A test (or a fixture of a wider scope, seen at the next test) that leaves SIGINT's handler or
    the blocked signals changed fails, naming the change; the state is put back, so the tests and
    children after it still see Ctrl-C as the suite was started with."""
    if not _SIGINT_AT_START:
        _SIGINT_AT_START.append(_sigint_state())
    start = _SIGINT_AT_START[0]
    if (before := _sigint_state()) != start:
        _put_back(start)
        pytest.fail(f"SIGINT's handler / blocked signals changed before this test (by a module or session "
                    f"fixture, or the previous test's teardown): {start} -> {before}")
    yield
    if (after := _sigint_state()) != start:
        _put_back(start)
        pytest.fail(f"this test left SIGINT's handler / blocked signals changed: {start} -> {after}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
