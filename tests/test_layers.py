"""The layers of docs/design.md, checked from the imports themselves: nothing points upwards, no cycles between
folders, and the runtime reaches neither torch nor build-time code."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import sadtalker_rt

PACKAGE = Path(sadtalker_rt.__file__).parent

# layer -> the package's layers it may import (besides itself)
CONTRACT = {"stages", "parity", "errors", "progress"}
ALLOWED = {
    "contract": set(),
    "media": {"contract"},
    "runtime": {"contract", "media"},
    "models": {"contract"},
    "build": {"contract", "media", "runtime", "models"},
}
TOP = {"cli", "argv", "exit_codes", "command_inputs", "reports", "backend_choice",   # entry points: may import
       "bench", "conformance", "serving", "triton"}                                   # any layer


def layer_of(module: str) -> str:
    head = module.split(".")[1] if module.count(".") else ""
    if head in CONTRACT or module == "sadtalker_rt":
        return "contract"
    return "top" if head in TOP else head


def imports(path: Path) -> list[tuple[str, bool]]:
    """(module imported, at module level) for every import of sadtalker_rt or torch in ``path``."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        found += [(n, id(node) in top_level) for n in names if n.startswith(("sadtalker_rt", "torch"))]
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield module_name(path), path


def existing(name: str) -> bool:
    parts = name.split(".")
    return PACKAGE.parent.joinpath(*parts).with_suffix(".py").exists() or PACKAGE.parent.joinpath(*parts).is_dir()


def test_no_import_points_up_a_layer():
    wrong = []
    for module, path in modules():
        here = layer_of(module)
        if here == "top":
            continue
        for name, _ in imports(path):
            if name.startswith("torch") or not existing(name):
                continue
            there = layer_of(name)
            if there != here and there not in ALLOWED[here] and not (
                    module.endswith("torch_backend") and there == "models"):   # the torch backend runs the models
                wrong.append(f"{module} ({here}) imports {name} ({there})")
    assert not wrong, "\n".join(wrong)


def test_runtime_imports_torch_only_inside_the_torch_backend():
    wrong = [f"{module}: {name}" for module, path in modules() if layer_of(module) in ("runtime", "media", "contract")
             for name, top_level in imports(path)
             if name.startswith("torch") and (top_level or not module.endswith("torch_backend"))]
    assert not wrong, wrong


def test_no_cycles_between_layers():
    edges = {(layer_of(m), layer_of(n)) for m, p in modules() for n, _ in imports(p)
             if not n.startswith("torch") and existing(n) and layer_of(m) != layer_of(n)}
    for a, b in edges:
        assert (b, a) not in edges, f"{a} and {b} import each other"


def test_embedding_the_runtime_loads_no_torch_and_no_build_code():
    code = ("import sys, sadtalker_rt.runtime.pipeline, sadtalker_rt.runtime.backends.onnxruntime_backend, "
            "sadtalker_rt.runtime.backends.tensorrt_backend, sadtalker_rt.media; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('sadtalker_rt.build') "
            "or m.startswith('sadtalker_rt.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
