#!/usr/bin/env bash
# The test suite, on CPU, in minutes. GPU-only tests skip cleanly without CUDA; the long
# chaos soak is marked `slow` and left out (make test-all runs it).
# Two pytest-xdist workers (the CI machine has 2 cores), one thread each; TEST_WORKERS=N to change
# (0 = one process). Multi-process tests take free ports and their own temporary directories.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" -m "not slow" tests "$@"
