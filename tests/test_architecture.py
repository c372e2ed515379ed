"""The package's shape: imports only point down, functions stay short, and the reference switch
turns every fast path off."""

from __future__ import annotations

import ast
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import mixtral
from mixtral.generation import EagerStepper, choose_stepper
from mixtral.kernels import cpu_decode_kernels, cpu_row_kernels, reference, triton_applies
from mixtral.moe import default_implementation

PACKAGE = Path(mixtral.__file__).parent
IMPORT_TOOL = Path(__file__).parents[1].parent / "shared" / "tools" / "import_cycles.py"


@pytest.mark.skipif(not IMPORT_TOOL.exists(), reason="the shared import-graph tool is not beside this checkout")
def test_no_import_circle():
    out = subprocess.run([sys.executable, str(IMPORT_TOOL), str(PACKAGE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_package_import_inside_a_function_without_a_reason():
    """An import of the package inside a function hides a cycle from Python; the few that are
    there (optional dependencies) say why on the line before or after."""
    unexplained = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").startswith("mixtral")):
                    near = " ".join(lines[max(inner.lineno - 2, 0): inner.lineno])
                    if "#" not in near:
                        unexplained.append(f"{path.relative_to(PACKAGE)}:{inner.lineno}")
    assert not unexplained


def test_functions_are_short():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not long


def test_reference_switch_turns_every_fast_path_off():
    from conftest import tiny_kwargs

    model = mixtral.MixtralForCausalLM(mixtral.MixtralConfig(**tiny_kwargs())).eval()
    x = torch.randn(2, 8)
    with torch.inference_mode():
        kernels_built = cpu_row_kernels(x) is not None
        assert default_implementation(x, torch.nn.functional.silu) == "cpu"
        with reference():
            assert cpu_row_kernels(x) is None and cpu_decode_kernels(x) is None and not triton_applies(x)
            assert default_implementation(x, torch.nn.functional.silu) == "reference"
            assert type(choose_stepper(model)) is EagerStepper
            seen_elsewhere = []  # another thread is not inside the block

            def elsewhere():
                with torch.inference_mode():
                    seen_elsewhere.append(cpu_row_kernels(torch.randn(2, 8)))

            thread = threading.Thread(target=elsewhere)
            thread.start()
            thread.join(timeout=30)
            assert seen_elsewhere and (seen_elsewhere[0] is not None) == kernels_built
        assert (cpu_row_kernels(x) is not None) == kernels_built
