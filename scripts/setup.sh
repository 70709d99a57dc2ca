#!/usr/bin/env bash
# Create ./.venv with everything the project needs, from scratch, on a fresh machine.
# - On a machine without CUDA, the CPU build of torch goes in first, so the torch range in
#   pyproject.toml is already satisfied and pip never pulls a multi-GB CUDA build.
# - Idempotent: a second run with an unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && "$VENV/bin/python" -c "import torch, pretrain" 2>/dev/null; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=(pip_quiet "$VENV/bin/python" -m pip --disable-pip-version-check -q)

# pip repeats one "Location ... is ignored" warning per package for index folders that do not
# exist on some machines; drop those lines, keep every other message and pip's exit status.
pip_quiet() { "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] CUDA found: installing torch (CUDA build)"
    "${PIP[@]}" install "torch>=2.11,<2.15"
  elif "${PIP[@]}" install --no-index --no-deps "torch==2.13.0" 2>/dev/null; then
    # A local CPU wheel (pip's find-links) was found; now its dependencies.
    echo "[setup] no CUDA: installed the local CPU torch 2.13.0 wheel"
    "${PIP[@]}" install "torch==2.13.0"
  else
    echo "[setup] no CUDA: installing the CPU build of torch from the PyTorch CPU index"
    "${PIP[@]}" install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi

echo "[setup] installing gpt2-pretrain and its dependencies into $VENV"
"${PIP[@]}" install -e ".[dev]"
touch "$STAMP"
