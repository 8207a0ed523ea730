"""The vLLM source check: the installed vLLM passes, every patch is covered, and drift is reported by name."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flas_vllm.engine import compat

PROCESS_INPUTS = next(a for a in compat.ANCHORS if a.target.endswith("InputProcessor.process_inputs"))
INPUT_PROCESSOR_INIT = next(a for a in compat.ANCHORS if a.target.endswith("InputProcessor.__init__"))
SERVE_PARSER = next(a for a in compat.ANCHORS if a.target.startswith("vllm.entrypoints.common.cli_args:make_arg"))

FAKE_INPUT_PROCESSOR = '''
class InputProcessor:
    def __init__(self, vllm_config):
        self.process_inputs_async = make_async(
            self.process_inputs,
        )

    def process_inputs(self, request_id, prompt, {params}, arrival_time=None):
        return None
'''


def _tree(root: Path, params: str = "params", version: str = "9.9.9") -> Path:
    """A minimal vLLM source tree holding only the input processor module."""
    pkg = root / "vllm"
    (pkg / "v1" / "engine").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_version.py").write_text(f"__version__ = version = '{version}'\n")
    (pkg / "v1" / "engine" / "input_processor.py").write_text(FAKE_INPUT_PROCESSOR.format(params=params))
    return root


def test_installed_vllm_has_every_anchor(capsys):
    pytest.importorskip("vllm")
    assert compat.main([]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert f"{len(compat.ANCHORS)}/{len(compat.ANCHORS)} anchors OK" in out


def test_every_function_the_patches_wrap_is_an_anchor():
    patches = pytest.importorskip("flas_vllm.engine.patches")
    patches.install_all()
    targets = {t.strip() for a in compat.ANCHORS for t in a.target.split("|")}
    wrapped = {f"{owner.__module__}:{owner.__qualname__}.{name}" for owner, name in patches.WRAPPED}
    assert len(wrapped) >= 8
    assert wrapped <= targets, sorted(wrapped - targets)


def test_renamed_parameter_is_reported_changed(tmp_path):
    source = compat.VllmSource(_tree(tmp_path, params="sampling_params"))
    result = compat.check_anchor(source, PROCESS_INPUTS)
    assert result.status == "CHANGED"
    assert "expected to start (self, request_id, prompt, params)" in result.detail


def test_removed_source_fragment_is_reported_changed(tmp_path):
    root = _tree(tmp_path)
    path = root / "vllm" / "v1" / "engine" / "input_processor.py"
    path.write_text(path.read_text().replace("make_async(", "wrap_async("))
    result = compat.check_anchor(compat.VllmSource(root), INPUT_PROCESSOR_INIT)
    assert result.status == "CHANGED" and "make_async(" in result.detail


def test_a_wheel_is_read_without_installing_it(tmp_path):
    root = _tree(tmp_path / "src", params="params", version="0.99.0")
    wheel = tmp_path / "vllm-0.99.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for file in (root / "vllm").rglob("*.py"):
            zf.write(file, file.relative_to(root).as_posix())
    source = compat.VllmSource(wheel)
    assert source.version() == "0.99.0"
    assert compat.check_anchor(source, PROCESS_INPUTS).status == "OK"
    assert compat.check_anchor(source, SERVE_PARSER).status == "MISSING"  # neither of its two homes
    text = compat.report(source, compat.check(source, [PROCESS_INPUTS, SERVE_PARSER]))
    assert text.splitlines()[0] == f"vLLM 0.99.0 at {wheel}"
    assert text.splitlines()[-1] == "1/2 anchors OK, 1 not OK"


def test_an_anchor_that_moved_is_found_in_either_home(tmp_path):
    root = _tree(tmp_path)
    for home in ("common", "launchers"):
        (root / "vllm" / "entrypoints" / home).mkdir(parents=True, exist_ok=True)
    (root / "vllm" / "entrypoints" / "launchers" / "cli_args.py").write_text("def make_arg_parser(parser):\n    pass\n")
    assert compat.check_anchor(compat.VllmSource(root), SERVE_PARSER).status == "OK"


def test_cli_exit_status_follows_the_result(tmp_path):
    cmd = [sys.executable, "-m", "flas_vllm.cli", "check-vllm", str(_tree(tmp_path))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "MISSING  vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs" in proc.stdout
    assert "OK       vllm.v1.engine.input_processor:InputProcessor.process_inputs" in proc.stdout
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a vLLM wheel" in bad.stderr
