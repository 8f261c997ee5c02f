"""The import graph stays layered (docs/architecture.md): no circles, no reach into another module's
private names, no ``sys.path`` edits, and no layer importing one above it. Static: read from the sources
(imports inside functions and under TYPE_CHECKING count too)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hybrid_megatron", "data_pipeline")
SCRIPT_DIRS = ("tools", "benchmarks", "tests")

# Each layer may import its own and the layers listed before it (docs/architecture.md, "Layers").
LAYERS = [
    ("data", ["data_pipeline"]),
    ("config", ["hybrid_megatron.config", "hybrid_megatron.config_io", "hybrid_megatron.model.config",
                "hybrid_megatron.model.pattern", "hybrid_megatron.model.geometry", "hybrid_megatron.model.fp8_dims"]),
    ("model", ["hybrid_megatron.model"]),
    ("checkpoint", ["hybrid_megatron.checkpoint"]),
    ("training", ["hybrid_megatron.training"]),
    ("convert", ["hybrid_megatron.convert"]),
    ("eval", ["hybrid_megatron.eval"]),
    ("devtools", ["hybrid_megatron.devtools"]),
    ("cli", ["hybrid_megatron.cli", "hybrid_megatron.__main__", "hybrid_megatron"]),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import of ``path`` that resolves to ``known``."""
    out = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [a.name for a in node.names]
            taken = [n for n in names if f"{base}.{n}" not in known]
            if taken:  # `from pkg import submodule` depends on the submodule, not on the package's __init__
                out.append((base, taken))
            out += [(f"{base}.{n}", []) for n in names if f"{base}.{n}" in known]
    return out


def _edits_sys_path(node: ast.AST) -> bool:
    """``sys.path.insert(...)`` / ``.append`` / ``.extend``, or an assignment to ``sys.path``."""
    def is_sys_path(n: ast.AST) -> bool:
        return isinstance(n, ast.Attribute) and n.attr == "path" and isinstance(n.value, ast.Name) and n.value.id == "sys"

    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in ("insert", "append", "extend") and is_sys_path(node.func.value)
    if isinstance(node, ast.Assign):
        return any(is_sys_path(t) for t in node.targets)
    return False


def _layer(module: str) -> int:
    best = (-1, -1)
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                best = max(best, (len(prefix), i))
    assert best[1] >= 0, f"{module} belongs to no layer of LAYERS: add it to one"
    return best[1]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: {dep for dep, _ in _imports(p, m, known) if dep in known and dep != m} for m, p in modules.items()}


def test_no_import_circles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_no_layer_imports_a_layer_above_it():
    wrong = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
             for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m)]
    assert not wrong, "\n".join(wrong)


def test_no_private_names_across_modules_and_no_sys_path_edits():
    known = set(_modules())
    files = [p for d in (*PACKAGES, *SCRIPT_DIRS) for p in (ROOT / d).rglob("*.py")]
    found = []
    for path in files:
        name = _module_name(path)
        if any(_edits_sys_path(node) for node in ast.walk(ast.parse(path.read_text()))):
            found.append(f"{path.relative_to(ROOT)} edits sys.path")
        for module, names in _imports(path, name, known):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and module != name and module.split(".")[0] in PACKAGES:
                found.append(f"{path.relative_to(ROOT)} imports {private} from {module}")
    assert not found, "\n".join(found)
