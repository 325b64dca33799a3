"""The package's import graph: no circle, and no module below the deblender imports it."""

import ast
from pathlib import Path

import starnet

PACKAGE = Path(starnet.__file__).parent
#: The modules above `StarNetDeblender`, which use it.
USERS_OF_THE_DEBLENDER = {"starnet", "starnet.cli", "starnet.distributed",
                          "starnet.m2_benchmark"}


def import_graph():
    """starnet module -> the starnet modules it imports, at any depth of its code. An
    import of the package itself (``from . import __version__``) is left out: Python
    imports the package before any of its modules."""
    def name(path):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name(path): path for path in PACKAGE.rglob("*.py") if "tests" not in path.parts}
    graph = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                stem = node.module
                if node.level:   # relative: from the package, node.level - 1 up
                    parts = package.split(".")
                    parts = parts[:len(parts) - node.level + 1]
                    stem = ".".join(parts + ([node.module] if node.module else []))
                targets.update(f"{stem}.{alias.name}" for alias in node.names)
                targets.add(stem)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[module] = {target for target in targets
                         if target in modules and target not in (module, "starnet")}
    return graph


def test_no_import_circle():
    graph = import_graph()
    assert "starnet.inference" in graph["starnet.deblender"]
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in graph[module]:
            assert state.get(target) != "open", f"import circle: {path + [target]}"
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_nothing_below_the_deblender_imports_it():
    graph = import_graph()
    assert {module for module, targets in graph.items()
            if "starnet.deblender" in targets} == USERS_OF_THE_DEBLENDER
