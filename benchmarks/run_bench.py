"""Run the flas-vllm benchmark (flas_vllm.bench); same options as `flas-vllm bench --help`.

    python benchmarks/run_bench.py --model fixture --ks 1,8,64 --num-prompts 64 --output-len 32
    python benchmarks/run_bench.py --model bench-2b-shape

Results: benchmarks/results/bench_<model>.{json,md,png} (or --out DIR); with --graph-path,
bench_<model>-graph-path.{json,md,png} next to them.
"""

import sys

from flas_vllm.cli import app

if __name__ == "__main__":
    app(args=["bench", *sys.argv[1:]], prog_name="run_bench.py")
