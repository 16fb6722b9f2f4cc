"""The shape of the package (issue 13), read from its source with ast: drgn in one
module, no import cycle, no module outside lab/ over 600 lines, an architecture in its
arch/ module with a line in the lab's table."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "inspect_vmemmap"


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def _imports(name: str, path: Path):
    """Every module of the package that ``name`` imports, at module level or in a function."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod
            for a in node.names:  # "from inspect_vmemmap import report" imports a module
                yield f"{mod}.{a.name}"


def test_drgn_is_imported_by_one_module():
    users = sorted(name for name, path in _modules()
                   if any(m == "drgn" or m.startswith("drgn.") for m in _imports(name, path)))
    assert users == ["inspect_vmemmap.source.drgn"]


def test_no_import_cycle():
    mods = dict(_modules())
    graph = {name: sorted({m for m in _imports(name, path) if m in mods and m != name}) for name, path in mods.items()}
    # a package's __init__ is imported with any of its modules: count only explicit edges
    cycles = []
    state = {}

    def visit(n, stack):
        state[n] = 1
        stack.append(n)
        for m in graph[n]:
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m, stack)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])
    # a package importing its own submodules (a registry loading its members) is no cycle
    cycles = [c for c in cycles if not all(x == c[0] or x.startswith(c[0] + ".") for x in c)]
    assert not cycles, cycles


def test_no_module_outside_the_lab_over_600_lines():
    big = {name: n for name, path in _modules() if ".lab" not in name
           for n in [len(path.read_text().splitlines())] if n > 600}
    assert not big, big


def test_each_architecture_has_its_module_and_lab_line():
    from inspect_vmemmap import arch
    from inspect_vmemmap.lab.arch import ARCHES

    assert arch.names() == sorted(ARCHES)
    for name in arch.names():
        a = arch.get(name)
        assert a.name == name and a.drgn_name and a.elf_machine and a.root_source
