#!/usr/bin/env bash
# Fresh machine -> steered vs unsteered generations on the embedded tiny fixture.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/flas-vllm demo "$@"
