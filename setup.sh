#!/usr/bin/env bash
# Creates .venv in this checkout and installs aejob with its dev extras.
# CPU by default: the CPU torch 2.13.0 wheel goes in first so no multi-GB CUDA build is pulled.
#   ./setup.sh              CPU torch (default)
#   ./setup.sh --cuda cu126 CUDA torch build from the PyTorch index (GPU machines)
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
CUDA=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cuda) CUDA="$2"; shift 2 ;;
    -h|--help) sed -n 2,6p "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[[ -d .venv ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [[ -n "$CUDA" ]]; then
  .venv/bin/pip install -q "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${CUDA}"
else
  # A local CPU wheel where the machine has one; else PyTorch's CPU index.
  .venv/bin/pip install -q "torch==${TORCH_VERSION}" \
    || .venv/bin/pip install -q "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/pip install -q -e ".[dev]"
.venv/bin/aejob --help >/dev/null
echo "aejob installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
