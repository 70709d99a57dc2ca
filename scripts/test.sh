#!/usr/bin/env bash
# The test suite, on CPU, in minutes. GPU-only tests skip cleanly without CUDA; the long
# chaos soak is marked `slow` and left out (make test-all runs it).
# Two pytest-xdist workers (the CI machine has 2 cores), one thread each; TEST_WORKERS=N to change
# (0 = one process). Multi-process tests take free ports and their own temporary directories.
#
# Then two steps of their own, each run whatever the one before it gave (the script fails at the end
# if any step failed); arguments (scripts/test.sh tests/test_x.py) run just those tests, no step.
# 1. The kernel matrix: the tests that compare floating-point results of two code paths
#    (`-m numerics`, tolerances from tests/numerics.py) again under the kernels other CPUs give --
#    ATen's dispatch capped at `default` (no vector ISA) and `avx2`, `avx512` where this CPU has it and
#    it is not already what ATen picks, and oneDNN capped at AVX2 (no AVX512-BF16/AMX) -- so a result
#    that holds only by this machine's kernels fails here. The torch.compile ones are left out of the
#    matrix (their numerics are the eager kernels'; their cost is the compiler's). TEST_MATRIX=0 skips it.
# 2. The launchers on a real 2-node SLURM cluster (tests/cluster, marker `cluster`; one process: one
#    cluster per machine): as root with network namespaces (CI) they run, elsewhere they skip with one
#    line saying why. CLUSTER_TESTS=0 leaves them out.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
workers=${TEST_WORKERS:-2}
failed=()
step() { local name=$1; shift; "$@" || failed+=("$name"); }

step suite .venv/bin/python -m pytest -q -n "$workers" -m "not slow and not cluster" tests "$@"
if [[ $# == 0 && "${TEST_MATRIX:-1}" != 0 ]]; then
    settings=("ATEN_CPU_CAPABILITY=default" "ATEN_CPU_CAPABILITY=avx2" "ONEDNN_MAX_CPU_ISA=AVX2")
    if [ -z "${ATEN_CPU_CAPABILITY:-}" ] && grep -qw avx512f /proc/cpuinfo 2>/dev/null \
            && [ "$(.venv/bin/python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')" != AVX512 ]; then
        settings+=("ATEN_CPU_CAPABILITY=avx512")
    fi
    for setting in "${settings[@]}"; do
        echo "== kernel matrix: $setting"
        step "matrix $setting" env "$setting" .venv/bin/python -m pytest -q -n "$workers" -p no:cacheprovider \
            -m "numerics and not slow and not cluster" -k "not compile" tests
    done
fi
if [[ $# == 0 && "${CLUSTER_TESTS:-1}" != 0 ]]; then
    echo "== the launchers on a real 2-node SLURM cluster"
    step cluster .venv/bin/python -m pytest -q -n 0 -m cluster tests/cluster
fi
if ((${#failed[@]})); then
    echo "scripts/test.sh: failed steps: ${failed[*]}" >&2
    exit 1
fi
