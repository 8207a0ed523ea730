"""The package's shape: the core imports no vLLM/Ray/OpenAI, every module stays small."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import flas_vllm

PACKAGE = pathlib.Path(flas_vllm.__file__).parent
MAX_MODULE_LINES = 400


def test_importing_the_core_loads_no_vllm_ray_or_openai():
    modules = sorted(p.stem for p in (PACKAGE / "core").glob("*.py") if p.stem != "__init__")
    assert {"flow", "checkpoint", "steering", "families", "config"} <= set(modules)
    code = (
        "import sys\n"
        + "".join(f"import flas_vllm.core.{m}\n" for m in modules)
        + "import flas_vllm\n"
        + "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'ray', 'openai', 'matplotlib'))\n"
        + "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing flas_vllm.core pulled in: {out}"


def test_every_module_is_under_400_lines():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    big = {k: v for k, v in sizes.items() if v >= MAX_MODULE_LINES}
    assert not big, f"modules of {MAX_MODULE_LINES}+ lines: {big}"


def test_every_subpackage_says_what_lives_there():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = init.read_text().strip()
        assert doc.startswith('"""') and len(doc) > 20, f"{init.parent.name}/ has no docstring"


def test_readme_performance_table_is_generated_from_the_benchmark_output():
    import json

    from flas_vllm.bench.report import README_BEGIN, README_END, readme_table

    root = PACKAGE.parent
    report = json.loads((root / "benchmarks/results/bench_bench-2b-shape.json").read_text())
    readme = (root / "README.md").read_text()
    block = readme[readme.index(README_BEGIN):readme.index(README_END) + len(README_END)]
    assert block == readme_table(report), "README table is stale: run python benchmarks/readme_table.py"
