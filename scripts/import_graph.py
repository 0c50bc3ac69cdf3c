"""The package's import graph, every import counted (lazy and TYPE_CHECKING ones too): its
cycles, the importers of the composition root, and the biggest functions.

    .venv/bin/python scripts/import_graph.py [ROOT]

import-linter (`lint-imports`) enforces the layering; this prints what a review looks at.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in (root / "edgeagent").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return groups


def biggest_functions(root: Path, known: dict[str, Path], n: int = 8) -> list[tuple[int, str]]:
    sizes = []
    for path in known.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                sizes.append((lines, f"{path.relative_to(root)}:{node.lineno} {node.name}"))
    return sorted(sizes, reverse=True)[:n]


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    known = modules(root)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    print(f"modules: {len(known)}, imports between them: {sum(map(len, graph.values()))}")
    print("cycles:", cycles(graph) or "none")
    print("importers of edgeagent.daemon:",
          sorted(m for m, deps in graph.items() if "edgeagent.daemon" in deps))
    print("biggest functions:")
    for lines, where in biggest_functions(root, known):
        print(f"  {lines:4d} {where}")


if __name__ == "__main__":
    main()
