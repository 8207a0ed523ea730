"""Write the README's performance table from benchmarks/results/bench_<model>.json (default: bench-2b-shape),
with a second table from bench_<model>-graph-path.json when that lies next to it.

    python benchmarks/readme_table.py [benchmarks/results/bench_bench-2b-shape.json]
"""
import pathlib
import sys

from flas_vllm.bench.report import readme_table_from, replace_readme_table

root = pathlib.Path(__file__).resolve().parent.parent
src = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else root / "benchmarks/results/bench_bench-2b-shape.json"
readme = root / "README.md"
readme.write_text(replace_readme_table(readme.read_text(), readme_table_from(src)))
print(f"README.md: performance table from {src}")
