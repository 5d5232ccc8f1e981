"""The package's import rules, checked over its own import graph (top-level and in-function imports).

The subpackages depend one way: errors, reliability and images, then base models, adapters, files, the
loader, then training, tools and the toy world, then the studio, then the command line. No tool imports
another (each command's module uses the library, never a sibling command), and the graph has no cycle.
`sdlora/__init__.py` is the public facade and may name anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "sdlora"

# Lower layers never import higher ones; a module may import its own layer and any below it.
LAYERS = [
    {"errors", "threads", "reliability", "images"},
    {"base_models"},
    {"adapters"},
    {"files"},
    {"loader"},
    {"training", "tools"},
    {"toy"},
    {"studio"},
    {"cli", "__main__"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every sdlora module this file imports, wherever the import statement is."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "sdlora"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sdlora":
                continue
            # `from . import loader` imports the module sdlora.loader; `from .x import name` imports x
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate) else target)
    return found - {name}


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def _unit(module: str) -> str:
    """The top-level part of the package a module belongs to (`files`, `loader`, `cli`, ...)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    unit = _unit(module)
    for index, units in enumerate(LAYERS):
        if unit in units:
            return index
    raise AssertionError(f"{module}: its part of the package, {unit!r}, has no place in LAYERS; add it")


def test_the_graph_sees_imports_of_every_kind():
    """The walker itself: relative, absolute and in-function imports all count."""
    graph = import_graph()
    assert "sdlora.errors" in graph["sdlora.base_models.sources"]  # `from ..errors import` at the top
    assert "sdlora.base_models.single_file" in graph["sdlora.base_models.sources"]  # inside load_pipeline
    assert "sdlora.loader" in graph["sdlora"]  # `from . import loader`, inside __getattr__
    assert len(graph) > 40


def test_imports_run_one_way():
    graph = import_graph()
    wrong = sorted(f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
                   for module, targets in graph.items() if module != "sdlora"
                   for target in targets if target != "sdlora" and _layer(target) > _layer(module))
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_tool_imports_another():
    graph = import_graph()
    tools = {module for module in graph if module.startswith("sdlora.tools.")}
    crossed = sorted(f"{module} imports {target}" for module in tools for target in graph[module] & tools)
    assert not crossed, "\n".join(crossed)


def test_no_cycles():
    graph = import_graph()
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target == "sdlora":  # the facade imports everything lazily; importing it is no edge back
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in graph:
        if module != "sdlora" and module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


FAMILY_CONSTANTS = {"SD1", "SD2", "SDXL"}


def _family_branches(path: Path) -> list[str]:
    """Comparisons with a family (`family is SDXL`, `family.name == "sd2"`): a family fact kept outside Family."""
    from sdlora.base_models.families import FAMILIES

    names = set(FAMILIES)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        for operand in (node.left, *node.comparators):
            if (isinstance(operand, ast.Name) and operand.id in FAMILY_CONSTANTS
                    or isinstance(operand, ast.Constant) and operand.value in names
                    and any(isinstance(side, ast.Attribute) and side.attr == "name"
                            for side in (node.left, *node.comparators))):
                where = path.relative_to(PACKAGE.parent) if path.is_relative_to(PACKAGE.parent) else path.name
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_nothing_outside_families_branches_on_a_family():
    """What differs by family is a field of Family; code asks for the field instead of comparing families."""
    found = [line for path in sorted(PACKAGE.rglob("*.py")) if path.name != "families.py"
             for line in _family_branches(path)]
    assert not found, "\n".join(found)


def test_the_family_check_finds_a_branch(tmp_path):
    branchy = tmp_path / "branchy.py"
    branchy.write_text('if family is SDXL:\n    pass\nif family.name == "sd2":\n    pass\n'
                       'if name == "sd2":\n    pass\n')
    assert [line.split(":")[1] for line in _family_branches(branchy)] == ["1", "3"]
