"""The package's layer contract (.importlinter) and what import-linter does not check: imports of mtl_keras inside
functions and import cycles within a layer."""

import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "mtl_keras")


def _modules():
    """{dotted module name: parsed source} of every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                with open(path, encoding="utf-8") as f:
                    found[dotted] = ast.parse(f.read(), path)
    return found


def _imported(node):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return []


def test_no_module_imports_mtl_keras_inside_a_function():
    # Lazy imports are for optional third-party dependencies (TensorFlow, JAX, torch, onnx ...) only.
    inside = []
    for module, tree in _modules().items():
        for function in ast.walk(tree):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if any(n == "mtl_keras" or n.startswith("mtl_keras.") for n in _imported(node)):
                        inside.append(f"{module}:{node.lineno}")
    assert inside == []


def test_the_package_has_no_import_cycle():
    modules = _modules()
    edges = {m: {t for node in ast.walk(tree) for t in _imported(node) if t in modules and t not in (m, "mtl_keras")}
             for m, tree in modules.items() if m != "mtl_keras"}  # the package's face re-exports; it is no layer
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.subprocess
def test_the_layer_contract_holds():
    lint_imports = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")
    if not os.path.exists(lint_imports):
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    done = subprocess.run([lint_imports, "--no-cache", os.path.join(ROOT, ".importlinter")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout
