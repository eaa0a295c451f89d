"""The package's imports, read from its source (every import statement, inside functions too): no module imports
another module's `_private` name, and no import cycle, so each layer can be read (and loaded) on its own."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tuneavideo"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(name: str) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import of the package's own modules in module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base not in MODULES:
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{item}" for item in names if f"{base}.{item}" in MODULES]
            found += [(module, []) for module in submodules]
            found.append((base, [item for item in names if f"{base}.{item}" not in MODULES]))
    return found


def test_the_walk_sees_the_package():
    assert {"tuneavideo.editing", "tuneavideo.run", "tuneavideo.pipelines.local_edit"} <= set(MODULES)
    assert ("tuneavideo.run", ["EditFiles", "EditResult", "Run"]) in imports("tuneavideo.editing")


def test_no_module_imports_a_private_name_of_another():
    private = [f"{name} imports {item} from {module}" for name in MODULES for module, items in imports(name)
               for item in items if item.startswith("_") and not item.startswith("__") and module != name]
    assert private == []


def test_the_package_has_no_import_cycle():
    graph = {name: {module for module, _ in imports(name) if module != name} for name in MODULES}
    done, cycles = set(), []

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycles.append(" -> ".join(path[path.index(name):] + [name]))
            return
        if name in done:
            return
        for module in sorted(graph[name]):
            visit(module, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert cycles == []
