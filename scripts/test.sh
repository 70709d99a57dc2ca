#!/usr/bin/env bash
# The test suite, on CPU, in minutes. GPU-only tests skip cleanly without CUDA; the long
# chaos soak is marked `slow` and left out (make test-all runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -m "not slow" tests "$@"
