"""The layering rules of the vdifs package, checked on its source text.

The package is read with `ast`, never imported: importing would run module
code, would only see the imports a run happens to reach, and could not be
pointed at a planted copy of the tree. Every import statement counts, also
those inside functions and `if TYPE_CHECKING:` blocks: a function-local import
is still a dependency, it is only paid for later.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

PACKAGE = "vdifs"

# Which layers a layer may import (itself always). The top-level modules
# vdifs/errors.py and vdifs/fsutil.py are layers of their own.
ALLOWED: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "fsutil": frozenset({"errors"}),
    "notify": frozenset(),
    "model": frozenset({"errors"}),
    "store": frozenset({"errors", "fsutil", "model"}),
    "wire": frozenset({"errors", "model"}),
    "metrics": frozenset({"errors", "model", "wire"}),
    "meta": frozenset({"errors", "fsutil", "model", "wire"}),
    "peer": frozenset({"errors", "fsutil", "notify", "model", "store", "wire", "meta", "metrics"}),
    "client": frozenset({"errors", "fsutil", "model", "store", "wire", "meta"}),
    "control": frozenset({"errors", "model", "wire", "client"}),
    "nbd": frozenset({"errors", "model", "client"}),
    "fuse": frozenset({"errors", "fsutil", "notify", "model", "client", "control", "nbd", "metrics"}),
    "cli": frozenset({"errors", "fsutil", "notify", "model", "store", "wire", "meta", "peer", "client", "control", "nbd",
                      "fuse", "metrics"}),
}

# vdifs/__init__.py holds only the version and docstring: any layer may read
# it (the cycle check catches it should it ever import something back).
# vdifs/__main__.py is the `python -m vdifs` entry point, part of the CLI.
ROOT_LAYER = "root"
ENTRY_POINTS = {f"{PACKAGE}.__main__": "cli"}


@dataclass(frozen=True)
class Import:
    """One dependency of one module on another, as written in the source."""

    importer: str
    imported: str
    line: int
    names: tuple[str, ...] = ()  # the names a `from m import a, b` takes from `imported`


@dataclass
class Package:
    """The modules of a package tree and the imports between them."""

    modules: dict[str, str] = field(default_factory=dict, repr=False)  # module name -> file path
    imports: list[Import] = field(default_factory=list, repr=False)
    private_uses: list[tuple[str, int, str]] = field(default_factory=list, repr=False)  # (importer, line, "mod._x")

    def graph(self) -> dict[str, set[str]]:
        edges: dict[str, set[str]] = {m: set() for m in self.modules}
        for imp in self.imports:
            if imp.imported in self.modules and imp.imported != imp.importer:
                edges[imp.importer].add(imp.imported)
        return edges


def module_name(src_root: str, path: str) -> str:
    rel = os.path.relpath(path, src_root)[: -len(".py")]
    parts = rel.split(os.sep)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def iter_modules(src_root: str) -> Iterator[tuple[str, str]]:
    """(module name, path) for every .py file of the package under src_root."""
    for dirpath, dirnames, filenames in os.walk(os.path.join(src_root, PACKAGE)):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                yield module_name(src_root, path), path


def is_package(modules: dict[str, str], name: str) -> bool:
    return modules.get(name, "").endswith("__init__.py")


def resolve_from(modules: dict[str, str], importer: str, node: ast.ImportFrom) -> str:
    """The absolute module a `from X import ...` reads from (relative imports too)."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package(modules, importer):
        base.pop()  # a plain module's relative imports start at its package
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def read_package(src_root: str) -> Package:
    """Parse every module of the package under src_root and collect its imports."""
    pkg = Package(dict(iter_modules(src_root)))
    for name, path in pkg.modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        bound: dict[str, str] = {}  # local name -> vdifs module it refers to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                        pkg.imports.append(Import(name, alias.name, node.lineno))
                        if alias.asname:
                            bound[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                source = resolve_from(pkg.modules, name, node)
                if source != PACKAGE and not source.startswith(PACKAGE + "."):
                    continue
                plain: list[str] = []
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in pkg.modules:  # `from vdifs.wire import objlist`: a submodule
                        pkg.imports.append(Import(name, sub, node.lineno))
                        bound[alias.asname or alias.name] = sub
                    else:
                        plain.append(alias.name)
                if plain:
                    pkg.imports.append(Import(name, source, node.lineno, tuple(plain)))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and is_private(node.attr)
                    and bound[node.value.id] != name):
                pkg.private_uses.append((name, node.lineno, f"{bound[node.value.id]}.{node.attr}"))
    return pkg


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def layer_of(module: str) -> str | None:
    """The layer a module belongs to; None for a module outside the table."""
    if module == PACKAGE:
        return ROOT_LAYER
    if module in ENTRY_POINTS:
        return ENTRY_POINTS[module]
    top = module.split(".")[1]
    return top if top in ALLOWED else None


def layer_violations(pkg: Package) -> list[str]:
    """Every import of a layer the importer's layer may not use, one line each."""
    found = []
    for mod in sorted(pkg.modules):
        if layer_of(mod) is None:
            found.append(f"{mod}: in no layer of the table")
    for imp in sorted(pkg.imports, key=lambda i: (i.importer, i.line, i.imported)):
        src, dst = layer_of(imp.importer), layer_of(imp.imported)
        if src is None or src == ROOT_LAYER or dst == ROOT_LAYER or src == dst:
            continue
        if dst is None or dst not in ALLOWED[src]:
            found.append(f"{imp.importer}:{imp.line} imports {imp.imported} ({src} -> {dst or 'no layer'})")
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; the components of more than one module,
    or of one module that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1 or node in graph[node]:
                    found.append(sorted(comp))
    return sorted(found)


def shortest_cycle(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    """One shortest import cycle through `start` within a component, as a
    path that ends where it starts: a readable witness of the cycle."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    raise ValueError(f"{start} is on no cycle")


def cycle_witnesses(graph: dict[str, set[str]], component: list[str]) -> list[list[str]]:
    """Shortest cycles through the component's modules until each module is on one."""
    members, covered, cycles = set(component), set(), []
    for start in component:
        if start not in covered:
            cycle = shortest_cycle(graph, start, members)
            covered.update(cycle)
            cycles.append(cycle)
    return cycles


def import_cycles(pkg: Package) -> list[list[str]]:
    """The modules of every import cycle, one sorted list per cycle group."""
    return strongly_connected(pkg.graph())


def describe_cycles(pkg: Package) -> list[str]:
    graph = pkg.graph()
    return [f"cycle among {', '.join(comp)}: "
            + "; ".join(" -> ".join(c) for c in cycle_witnesses(graph, comp))
            for comp in strongly_connected(graph)]


def private_imports(pkg: Package) -> list[str]:
    """Every private name (`_x`) one module takes from another: by
    `from m import _x`, or as `m._x` on a module it imported."""
    found = []
    for imp in pkg.imports:
        for n in imp.names:
            if is_private(n):
                found.append(f"{imp.importer}:{imp.line} imports {imp.imported}.{n}")
        last = imp.imported.rsplit(".", 1)[-1]
        if not imp.names and is_private(last) and imp.imported in pkg.modules:
            found.append(f"{imp.importer}:{imp.line} imports private module {imp.imported}")
    for importer, line, what in pkg.private_uses:
        found.append(f"{importer}:{line} uses {what}")
    return sorted(set(found))


def source_root() -> str:
    """The directory holding the vdifs package this test file belongs with."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
