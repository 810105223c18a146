#!/usr/bin/env bash
# Create .venv in the repo root and install the project into it.
#
# Torch comes first and on purpose: a bare `pip install torch` on Linux pulls several GB of CUDA
# wheels. On a machine without an NVIDIA GPU we install the CPU build of $TORCH_VERSION (from
# $TORCH_INDEX_URL when set, e.g. https://download.pytorch.org/whl/cpu); a torch that is already
# in the venv (your CUDA build, say) is kept, because the package only asks for torch>=2.4.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  extra=()
  [ -n "${TORCH_INDEX_URL:-}" ] && extra=(--index-url "$TORCH_INDEX_URL")
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found: installing torch==$TORCH_VERSION (CUDA build)"
  else
    echo "[setup] no GPU: installing the CPU build of torch==$TORCH_VERSION"
  fi
  "${PIP[@]}" "${extra[@]}" "torch==$TORCH_VERSION"
fi

# Reinstalling is cheap when nothing changed, but skip it entirely when pyproject.toml is older
# than the stamp: repeated `scripts/test.sh` runs should not wait on pip.
stamp=.venv/.rlhf-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing rlhf and its dependencies into .venv"
  "${PIP[@]}" -e ".[label,dev]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  touch "$stamp"
fi
.venv/bin/python -c "import torch, rlhf; print(f'[setup] ready: rlhf {rlhf.__version__}, torch {torch.__version__}')"
