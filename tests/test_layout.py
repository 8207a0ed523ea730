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
    from flas_vllm.bench.report import README_BEGIN, README_END, readme_table_from

    root = PACKAGE.parent
    readme = (root / "README.md").read_text()
    block = readme[readme.index(README_BEGIN):readme.index(README_END) + len(README_END)]
    assert block == readme_table_from(root / "benchmarks/results/bench_bench-2b-shape.json"), \
        "README table is stale: run python benchmarks/readme_table.py"


def _top_level_imports(tree) -> dict[str, str]:
    """name -> module for each `from module import name` at module level."""
    import ast

    return {a.asname or a.name: node.module for node in tree.body if isinstance(node, ast.ImportFrom)
            for a in node.names}


def test_every_steered_class_is_defined_at_module_level_over_its_familys_vllm_class():
    import ast

    from flas_vllm.core.families import FAMILIES
    from flas_vllm.engine.plugin import steered_classes

    expected = {f.architecture: f.vllm_class for f in FAMILIES}
    expected.update({f.multimodal_architecture: f.multimodal_vllm_class for f in FAMILIES if f.multimodal_architecture})
    locations = steered_classes()
    assert set(locations) == set(expected)
    for arch, location in locations.items():
        module, _, name = location.partition(":")
        assert name == arch
        tree = ast.parse((PACKAGE.parent / (module.replace(".", "/") + ".py")).read_text())
        defs = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
        assert arch in defs, f"{arch}: no module-level `class {arch}` in {module}"
        bases = [b.id for b in defs[arch].bases if isinstance(b, ast.Name)]
        base_module, _, base_name = expected[arch].partition(":")
        assert bases == ["FlasCausalLMMixin", base_name], f"{arch}: bases {bases}"
        assert _top_level_imports(tree).get(base_name) == base_module, f"{arch}: {base_name} not from {base_module}"


def test_the_text_steered_classes_import_with_their_bases():
    import importlib

    from flas_vllm.core.families import FAMILIES
    from flas_vllm.engine.plugin import TEXT_MODELS

    models = importlib.import_module(TEXT_MODELS)
    for family in FAMILIES:
        cls = getattr(models, family.architecture)
        module, _, name = family.vllm_class.partition(":")
        assert cls.__module__ == TEXT_MODELS and cls.__qualname__ == family.architecture
        assert cls.__bases__ == (models.FlasCausalLMMixin, getattr(importlib.import_module(module), name))


def test_no_module_swaps_an_objects_class_at_run_time():
    import ast

    swaps = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            swaps += [f"{path.relative_to(PACKAGE)}:{node.lineno}" for t in targets
                      if isinstance(t, ast.Attribute) and t.attr == "__class__"]
    assert not swaps, f"`x.__class__ = ...` (use a subclass, a wrapper module or a hook): {swaps}"


def _imports(path: pathlib.Path):
    """(line, module, names) of every import in a module; relative imports resolved."""
    import ast

    package = ".".join(("flas_vllm", *path.relative_to(PACKAGE).parent.parts))
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            yield node.lineno, module, [a.name for a in node.names]


def test_shipped_code_imports_no_test_only_module():
    bad = [f"{p.relative_to(PACKAGE)}:{line}: {module}" for p in PACKAGE.rglob("*.py")
           for line, module, _ in _imports(p)
           if module.split(".")[0] in ("tests", "conftest", "pytest", "_pytest") or module == "flas_vllm.testing"]
    assert not bad, f"flas_vllm/ imports test-only code: {bad}"


# Private by name only, and the one way in: vLLM's Python bindings of its compiled kernels (its backends import it so).
PRIVATE_BY_NAME_ONLY = {("vllm", "_custom_ops")}


def test_no_module_imports_another_modules_private_names():
    bad = [f"{p.relative_to(PACKAGE)}:{line}: from {module} import {name}" for p in PACKAGE.rglob("*.py")
           for line, module, names in _imports(p) for name in names
           if name.startswith("_") and not name.startswith("__") and (module, name) not in PRIVATE_BY_NAME_ONLY]
    assert not bad, f"private names imported across modules (make them public or move them): {bad}"


def _is_indented_import(line: str) -> bool:
    text = line.strip()
    return line[:1].isspace() and (text.startswith("import ") or text.startswith("from ") and " import " in text)


def _uncommented_indented_imports(path: pathlib.Path) -> list[int]:
    """Line numbers of indented imports with no comment on their line nor on a comment line above their group."""
    lines = path.read_text().splitlines()
    bad = []
    for i, line in enumerate(lines):
        if not _is_indented_import(line) or "#" in line:
            continue
        j = i - 1  # walk up over the uncommented imports grouped with this one
        while j >= 0 and _is_indented_import(lines[j]) and "#" not in lines[j]:
            j -= 1
        if j < 0 or not lines[j].strip().startswith("#"):
            bad.append(i + 1)
    return bad


def test_every_in_function_import_says_why_it_is_lazy():
    """An import inside a function keeps an optional or heavy dependency lazy, or breaks a cycle: a comment says which."""
    bad = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := _uncommented_indented_imports(p))}
    assert not bad, f"indented imports without a comment saying why they are lazy (file: lines): {bad}"
