"""Write the README's performance table from benchmarks/results/bench_<model>.json (default: bench-2b-shape).

    python benchmarks/readme_table.py [benchmarks/results/bench_bench-2b-shape.json]
"""
import json
import pathlib
import sys

from flas_vllm.bench.report import readme_table, replace_readme_table

root = pathlib.Path(__file__).resolve().parent.parent
src = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else root / "benchmarks/results/bench_bench-2b-shape.json"
readme = root / "README.md"
readme.write_text(replace_readme_table(readme.read_text(), readme_table(json.loads(src.read_text()))))
print(f"README.md: performance table from {src}")
