"""The layout states the memory rule: imports go down only, and there is no cycle.

    entry points (main.py, dermal_fn/__init__, tools/) → serving/ → core/
    keras/ → core/          demo/ → keras/, core/          model_fetch/ knows no dermal_fn

Every ``import`` statement counts, at module level or inside a function (a lazy import is still an
edge). Only the serving layer's engine factory may reach the Keras side, and only lazily.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("dermal_fn", "model_fetch")

# layer -> the project layers it may import (itself included)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "models": set(),
    "core": {"core", "errors"},
    "serving": {"serving", "core", "errors", "models", "model_fetch"},
    "keras": {"keras", "core", "errors", "model_fetch"},
    "demo": {"demo", "keras", "core", "errors", "models"},
    "tools": {
        "tools",
        "package",
        "serving",
        "keras",
        "core",
        "demo",
        "batch",
        "errors",
        "models",
        "model_fetch",
    },
    "batch": {"batch", "serving", "core", "errors", "models", "model_fetch"},
    "package": {"serving", "errors"},  # dermal_fn/__init__.py: predict, predict_skin_with_explanation, …
    "main": {"package", "serving"},
    "__main__": {"tools"},  # python -m dermal_fn
    "model_fetch": {"model_fetch"},
}
# third-party packages a layer must never import, even lazily
FORBIDDEN_THIRD_PARTY: dict[str, set[str]] = {
    "core": {"tensorflow", "keras", "tf_keras", "flask", "werkzeug", "functions_framework", "google"},
    "serving": {"tensorflow", "keras", "tf_keras", "google"},
    "batch": {"tensorflow", "keras", "tf_keras", "google"},
    "model_fetch": {"tensorflow", "keras", "ai_edge_litert", "PIL", "numpy"},
}
# the one allowed reach from serving into the Keras side (lazy, inside a function)
LAZY_KERAS = {("dermal_fn.serving.engines", "dermal_fn.keras.reference")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    files = [REPO / "main.py"]
    for package in PACKAGES:
        files.extend(sorted((REPO / package).rglob("*.py")))
    return {module_name(path): path for path in files}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "main":
        return "main"
    if parts[0] == "model_fetch":
        return "model_fetch"
    if len(parts) == 1:
        return "package"
    return parts[1]


def imports_of(path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported name, line, at module level) for every import in the file, resolved to a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found: list[tuple[str, int, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno, id(node) in top_level) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                name = candidate if candidate in modules else node.module
                found.append((name, node.lineno, id(node) in top_level))
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name, _, _ in imports_of(path, modules):
            if name in modules and name != module:
                edges[module].add(name)
    return edges


def test_the_layout_has_the_layers() -> None:
    layers = {layer_of(m) for m in project_modules()}
    assert {"core", "serving", "keras", "demo", "tools", "errors", "models"} <= layers


def test_imports_go_down_only() -> None:
    modules = project_modules()
    wrong = []
    for module, path in modules.items():
        layer = layer_of(module)
        for name, line, top in imports_of(path, modules):
            if name.split(".")[0] not in PACKAGES and name != "main":
                if name.split(".")[0] in FORBIDDEN_THIRD_PARTY.get(layer, set()):
                    wrong.append(f"{path.relative_to(REPO)}:{line} imports {name}")
                continue
            target = layer_of(name)
            if (module, name) in LAZY_KERAS and not top:
                continue
            if target not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(REPO)}:{line} ({layer}) imports {name} ({target})")
    assert wrong == []


def test_there_is_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert cycles == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"a.py": "import b\n", "b.py": "def f():\n    import a\n"}, True),
        ({"a.py": "import b\n", "b.py": "x = 1\n"}, False),
    ],
)
def test_the_cycle_check_sees_function_level_imports(
    tmp_path: Path, files: dict[str, str], expected: bool
) -> None:
    """The checker's own oracle: a lazy import that closes a loop is found."""
    _write(tmp_path, files)
    modules = {p.stem: p for p in tmp_path.glob("*.py")}
    edges = {m: {n for n, _, _ in imports_of(p, modules) if n in modules} for m, p in modules.items()}
    assert ("a" in edges["b"] and "b" in edges["a"]) is expected
