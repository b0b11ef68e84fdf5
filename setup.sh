#!/usr/bin/env bash
# Creates ./.venv with fedpriv (editable) and its test tools.
#
# torch is installed first and on purpose: a plain `pip install torch` on a
# machine without a GPU pulls a multi-GB CUDA build. With an NVIDIA GPU the
# CUDA build is the newest of PyTorch's that the driver supports (nvidia-smi
# reports the driver's CUDA version); FEDPRIV_TORCH_CUDA=cu128 (or cpu)
# chooses by hand. Otherwise: a CPU wheel already on the machine (pip's
# find-links) or PyTorch's CPU index. FEDPRIV_SETUP_DRY_RUN=1 only prints the choice.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${FEDPRIV_TORCH_VERSION:-2.13.0}
VENV=${FEDPRIV_VENV:-.venv}
# PyTorch's CUDA builds, newest first, with the CUDA version each needs from the driver.
CUDA_BUILDS=("cu130 13.0" "cu128 12.8" "cu126 12.6")

# The build for this machine: cuXXX, or "cpu".
torch_build() {
  if [ -n "${FEDPRIV_TORCH_CUDA:-}" ]; then echo "$FEDPRIV_TORCH_CUDA"; return; fi
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || { echo cpu; return; }
  local driver
  driver=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n1)
  [ -n "$driver" ] || { echo cpu; return; }
  local build need
  for entry in "${CUDA_BUILDS[@]}"; do
    read -r build need <<<"$entry"
    if "$PYTHON" -c 'import sys; a, b = (tuple(map(int, v.split("."))) for v in sys.argv[1:]); sys.exit(a < b)' \
      "$driver" "$need"; then
      echo "$build"; return
    fi
  done
  echo "setup: the GPU driver supports CUDA $driver, older than PyTorch's builds (${CUDA_BUILDS[-1]#* }+); using the CPU" >&2
  echo cpu
}

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "fedpriv needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version))" >&2; exit 1; }

BUILD=$(torch_build)
if [ -n "${FEDPRIV_SETUP_DRY_RUN:-}" ]; then echo "torch==$TORCH_VERSION $BUILD"; exit 0; fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# pip compiles every module it installs, one at a time: most of this script's time. It installs without,
# and compileall does it once at the end on every core (compiled files matter: with PYTHONDONTWRITEBYTECODE
# set, every process would otherwise compile torch and transformers again).
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
INSTALL=(install --no-compile)

if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  if [ "$BUILD" != cpu ]; then
    echo "setup: GPU found, installing torch==$TORCH_VERSION for CUDA ($BUILD)"
    # Offline machines (a PyPI mirror only) get PyPI's own CUDA build instead.
    "${PIP[@]}" "${INSTALL[@]}" "torch==$TORCH_VERSION" --index-url "https://download.pytorch.org/whl/$BUILD" \
      --extra-index-url https://pypi.org/simple || "${PIP[@]}" "${INSTALL[@]}" "torch==$TORCH_VERSION"
    "$VENV/bin/python" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' \
      || echo "setup: warning: torch cannot use the GPU with this driver; rm -rf $VENV and rerun with FEDPRIV_TORCH_CUDA (e.g. cu126)" >&2
  elif "${PIP[@]}" "${INSTALL[@]}" --no-index --no-deps "torch==$TORCH_VERSION" >/dev/null 2>&1; then
    echo "setup: no GPU, using the local CPU wheel of torch==$TORCH_VERSION"
  else
    echo "setup: no GPU, installing CPU torch==$TORCH_VERSION from download.pytorch.org"
    "${PIP[@]}" "${INSTALL[@]}" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  fi
fi

"${PIP[@]}" "${INSTALL[@]}" -e ".[dev]"
# Not the packages' own test suites, nor the ~400 model families transformers ships that fedpriv never loads
# (BERT-style encoders only; anything else imported compiles in memory, as it would without this step).
"$VENV/bin/python" -m compileall -q -j 0 -x 'site-packages/(.+/)?tests/|site-packages/transformers/models/(?!(auto|bert)/|__init__)' \
  "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null || true
# fedpriv itself is installed editable: its rooms (pyproject's package-dir) are compiled where they are.
"$VENV/bin/python" -c 'import compileall, tomllib
for room in sorted(set(tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"].values())):
    compileall.compile_dir(room, quiet=1, workers=0)' >/dev/null || true
"$VENV/bin/fedpriv" --help >/dev/null
echo "setup: done. Activate with: source $VENV/bin/activate"
