"""On a test child's ``PYTHONPATH`` only (``tests/faults.py: child_env``): installs the faults its
environment names, before the program runs. Nothing else is changed."""

import os

if any(os.environ.get(k) for k in ("GPT2_TEST_FAULT", "GPT2_TEST_HANG", "GPT2_TEST_PREPARE_SLEEP")):
    import importlib.util
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location("gpt2_test_faults", Path(__file__).resolve().parents[1] / "faults.py")
    _faults = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_faults)
    _faults.install_from_env()
