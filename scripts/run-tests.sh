#!/usr/bin/env bash
# Fresh machine -> the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export FLAS_VLLM_CACHE="${FLAS_VLLM_CACHE:-$PWD/.cache/flas-vllm}"
exec .venv/bin/python -m pytest -q -ra "$@"
