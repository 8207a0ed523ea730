#!/usr/bin/env bash
# Fresh machine -> the embedded tiny fixture steered toward three concepts by a toy flow trained for it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/flas-vllm demo "$@"
