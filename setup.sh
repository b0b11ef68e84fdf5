#!/usr/bin/env bash
# Creates ./.venv with fedpriv (editable) and its test tools.
#
# torch is installed first and on purpose: a plain `pip install torch` on a
# machine without a GPU pulls a multi-GB CUDA build. Here a GPU gets the CUDA
# build from PyPI; otherwise a CPU wheel already on the machine (pip's
# find-links) or PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${FEDPRIV_TORCH_VERSION:-2.13.0}
VENV=${FEDPRIV_VENV:-.venv}

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "fedpriv needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version))" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing CUDA torch==$TORCH_VERSION"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
  elif "${PIP[@]}" install --no-index --no-deps "torch==$TORCH_VERSION" >/dev/null 2>&1; then
    echo "setup: no GPU, using the local CPU wheel of torch==$TORCH_VERSION"
  else
    echo "setup: no GPU, installing CPU torch==$TORCH_VERSION from download.pytorch.org"
    "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi

"${PIP[@]}" install -e ".[dev]"
"$VENV/bin/fedpriv" --help >/dev/null
echo "setup: done. Activate with: source $VENV/bin/activate"
