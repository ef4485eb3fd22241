"""The package's layout holds: imports run one way (no cycles, lazy imports included), no
private name is imported across modules, and no module grows past ~500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fastpc"
MAX_LINES = 500
# the standalone PCX worker runs under another interpreter and imports nothing of fastpc
OUTSIDE = {"fastpc.bench.pcx_speed"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every fastpc import in ``path``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("fastpc"):
                continue
            names = [a.name for a in node.names]
            # "from . import spc" imports the submodule fastpc.learners.spc
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            if subs:
                out += [(s, [], node.lineno) for s in subs]
                names = [n for n in names if f"{target}.{n}" not in mods]
            if names or not subs:
                out.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("fastpc")]
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for target, _, _ in _imports(m, path, mods):
            if target in mods and target != m:
                graph[m].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_imports_run_one_way():
    graph = _graph()
    # the top-level package re-exports; modules never import it back except the benches and
    # diagnostics' users outside the engine
    for m in graph:
        graph[m].discard("fastpc")
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_private_name_is_imported_across_modules():
    mods = _modules()
    bad = []
    for m, path in mods.items():
        for target, names, line in _imports(m, path, mods):
            bad += [f"{path.relative_to(PKG.parent)}:{line} imports {n} from {target}"
                    for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PKG.parent)): n for m, p in _modules().items()
            if m not in OUTSIDE and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
