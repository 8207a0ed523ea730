"""Does a vLLM release still have everything flas-vllm wraps, subclasses or calls, with the same signature?

Reads the release's source without importing it (an installed package, a
source tree, or a wheel file), so a new vLLM can be checked before anyone
installs it: `flas-vllm check-vllm PATH` or `python -m flas_vllm.engine.compat PATH`.
Each anchor is reported OK, MISSING (gone, or no longer defined where we wrap
it) or CHANGED (its parameters or the source fragments we rely on moved).
The version guard in `patches/__init__.py` should only cover releases that pass.
The anchors themselves are listed in `vllm_anchors.py`.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from flas_vllm.engine.vllm_anchors import ANCHORS, Anchor


@dataclass(frozen=True)
class Result:
    anchor: Anchor
    status: str  # OK, MISSING, CHANGED
    detail: str = ""


class VllmSource:
    """vLLM's Python files from an installed package, a source tree or a wheel, read as text."""

    def __init__(self, location: str | Path):
        self.location = Path(location)
        self._zip: zipfile.ZipFile | None = None
        self._root: Path | None = None
        if self.location.is_file() and self.location.suffix == ".whl":
            self._zip = zipfile.ZipFile(self.location)
        elif (self.location / "vllm" / "__init__.py").is_file():
            self._root = self.location / "vllm"
        elif (self.location / "__init__.py").is_file() and self.location.name == "vllm":
            self._root = self.location
        else:
            raise FileNotFoundError(
                f"{self.location}: not a vLLM wheel (.whl), a vllm package directory, or a directory holding one"
            )
        self._trees: dict[str, ast.Module | None] = {}

    @classmethod
    def installed(cls) -> "VllmSource":
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.origin:
            raise FileNotFoundError("vllm is not installed in this environment")
        return cls(Path(spec.origin).parent)

    def text(self, relpath: str) -> str | None:
        """relpath inside the package, e.g. 'config/vllm.py'."""
        if self._zip is not None:
            try:
                return self._zip.read(f"vllm/{relpath}").decode()
            except KeyError:
                return None
        path = self._root / relpath
        return path.read_text() if path.is_file() else None

    def module(self, dotted: str) -> tuple[ast.Module, str] | None:
        parts = dotted.split(".")[1:]
        for rel in ("/".join(parts) + ".py", "/".join([*parts, "__init__.py"])):
            if rel in self._trees:
                tree = self._trees[rel]
                if tree is not None:
                    return tree, self.text(rel) or ""
                continue
            text = self.text(rel)
            self._trees[rel] = ast.parse(text) if text is not None else None
            if text is not None:
                return self._trees[rel], text
        return None

    def version(self) -> str:
        text = self.text("_version.py") or ""
        found = re.search(r"__version__\s*(?::[^=]+)?=\s*(?:version\s*=\s*)?['\"]([^'\"]+)['\"]", text)
        return found.group(1) if found else "unknown"


def _bindings(body: Iterable[ast.stmt]) -> dict[str, ast.AST]:
    """Names a module or class body defines (the last definition wins, as at run time)."""
    found: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = node
    return found


def _resolve(source: VllmSource, target: str) -> tuple[ast.AST, str] | None:
    module, _, qualname = target.partition(":")
    loaded = source.module(module)
    if loaded is None:
        return None
    node: ast.AST = loaded[0]
    for part in qualname.split("."):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            return None
        node = _bindings(body).get(part)
        if node is None:
            return None
    return node, loaded[1]


def _signature(node: ast.AST) -> ast.arguments | None:
    if isinstance(node, ast.ClassDef):
        init = _bindings(node.body).get("__init__")
        return init.args if isinstance(init, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return node.args
    return None


def check_anchor(source: VllmSource, anchor: Anchor) -> Result:
    results = [_check_at(source, anchor, target.strip()) for target in anchor.target.split("|")]
    return next((r for r in results if r.status == "OK"), results[0])


def _check_at(source: VllmSource, anchor: Anchor, target: str) -> Result:
    found = _resolve(source, target)
    if found is None:
        return Result(anchor, "MISSING", "not defined there")
    node, text = found
    if anchor.params or anchor.keywords:
        args = _signature(node)
        if args is None:
            return Result(anchor, "CHANGED", "no longer a function or a class with __init__")
        positional = [a.arg for a in (*args.posonlyargs, *args.args)]
        named = set(positional) | {a.arg for a in args.kwonlyargs}
        if positional[: len(anchor.params)] != list(anchor.params):
            return Result(anchor, "CHANGED", f"parameters ({', '.join(positional)}), "
                                             f"expected to start ({', '.join(anchor.params)})")
        missing = [k for k in anchor.keywords if k not in named]
        if missing:
            return Result(anchor, "CHANGED", f"no parameter {', '.join(missing)}")
    if anchor.contains:
        segment = ast.get_source_segment(text, node) or ""
        absent = [frag for frag in anchor.contains if frag not in segment]
        if absent:
            return Result(anchor, "CHANGED", f"source no longer contains {absent[0]!r}")
    return Result(anchor, "OK")


def check(source: VllmSource, anchors: Iterable[Anchor] = ANCHORS) -> list[Result]:
    return [check_anchor(source, a) for a in anchors]


def _describe(anchor: Anchor) -> str:
    sig = ""
    if anchor.params or anchor.keywords:
        sig = "(" + ", ".join([*anchor.params, *("..." for _ in anchor.keywords[:1]), *anchor.keywords]) + ")"
    return anchor.target + sig


def report(source: VllmSource, results: list[Result]) -> str:
    lines = [f"vLLM {source.version()} at {source.location}"]
    for r in results:
        lines.append(f"{r.status:<8} {_describe(r.anchor)}  [{r.anchor.used_by}]" + (f": {r.detail}" if r.detail else ""))
    bad = sum(r.status != "OK" for r in results)
    lines.append(f"{len(results) - bad}/{len(results)} anchors OK" + ("" if not bad else f", {bad} not OK"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print("usage: python -m flas_vllm.engine.compat [VLLM_WHEEL_OR_SOURCE_DIR]  (default: the installed vllm)")
        return 2
    try:
        source = VllmSource(args[0]) if args else VllmSource.installed()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = check(source)
    print(report(source, results))
    return 0 if all(r.status == "OK" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
