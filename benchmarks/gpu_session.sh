#!/usr/bin/env bash
# The prepared run for a lent GPU machine (torch and Triton there, no vLLM): the bucketed FULL-graph check
# (capture, replay against eager, timing) and the flow's throughput ceiling, JSON and logs under $OUT.
#   device tool: run(command="bash benchmarks/gpu_session.sh", timeout_s=590)   # ~7 min on an H200 (estimated)
#   QUICK=1 OUT=/tmp/x PYTHON=.venv/bin/python bash benchmarks/gpu_session.sh   # the CPU smoke test of it
set -u
out="${OUT:-/tmp/flas-gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this tree: nothing installed there
py="${PYTHON:-python}"
quick=()
if [ "${QUICK:-0}" = 1 ]; then quick=(--quick --device cpu); fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$out/machine.txt" 2>&1
"$py" benchmarks/gpu_bucketed_graphs.py "${quick[@]}" --json "$out/bucketed.json" 2>&1 | tee "$out/bucketed.log"
bucketed=${PIPESTATUS[0]}
"$py" benchmarks/gpu_ceiling.py "${quick[@]}" --json "$out/ceiling.json" 2>&1 | tee "$out/ceiling.log"
ceiling=${PIPESTATUS[0]}
echo "gpu_bucketed_graphs exit $bucketed, gpu_ceiling exit $ceiling (outputs in $out)"
[ "$bucketed" = 0 ] && [ "$ceiling" = 0 ]
