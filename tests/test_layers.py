"""The package's layers: no import cycle anywhere, and no import from a higher floor.

Floors, from the ground up (README, "Design"):

* ``dsq.core`` and ``dsq.assets``: errors, checkpoint reading, atomic outputs, manifests, text data;
* the stages, each importing only the ground floor and the stages before it:
  ``dsq.quantize`` < ``dsq.export`` < ``dsq.eval``, and ``dsq.finetune`` (over ``dsq.quantize``);
* ``dsq.run``: the orchestration (recipes, runs, the run tail, validate);
* ``dsq.tools`` and ``dsq.cli``: beside and above the run path.

Every import counts, the ones inside functions too (a lazy import is still a dependency), except those
under ``if TYPE_CHECKING:``, which only name types for annotations.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"dsq": "dsq", "dsq.quantize": "quantize", "dsq.finetune": "finetune", "dsq.export": "export", "dsq.eval": "eval"}

# floor of each top-level part, and the parts it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "dsq": set(),  # dsq/__init__.py: the version only
    "dsq.core": {"dsq"},
    "dsq.assets": {"dsq"},
    "dsq.quantize": {"dsq", "dsq.core", "dsq.assets"},
    "dsq.export": {"dsq", "dsq.core", "dsq.assets", "dsq.quantize"},
    "dsq.eval": {"dsq", "dsq.core", "dsq.assets", "dsq.quantize", "dsq.export"},
    "dsq.finetune": {"dsq", "dsq.core", "dsq.assets", "dsq.quantize"},
    "dsq.run": {"dsq", "dsq.core", "dsq.assets", "dsq.quantize", "dsq.export", "dsq.eval", "dsq.finetune"},
    "dsq.tools": {"dsq", "dsq.core", "dsq.assets", "dsq.quantize", "dsq.export", "dsq.eval", "dsq.finetune", "dsq.run"},
    "dsq.cli": {"dsq", "dsq.core", "dsq.assets", "dsq.quantize", "dsq.export", "dsq.eval", "dsq.finetune", "dsq.run", "dsq.tools"},
    "dsq.__main__": {"dsq.cli"},
}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            if package == "dsq" and parts and f"dsq.{parts[0]}" in PACKAGE_DIRS:
                continue
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The dsq modules ``name`` imports, anywhere in the file."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {
        id(inner) for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for stmt in node.body for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                out.add(candidate)
                break
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def part(module: str) -> str:
    for prefix in sorted(ALLOWED, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    raise AssertionError(f"{module} belongs to no floor of tests/test_layers.py")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_floor():
    for name in modules():
        part(name)


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_no_import_from_a_higher_floor():
    wrong = [
        f"{a} imports {b}"
        for a, targets in graph().items()
        for b in sorted(targets)
        if part(b) != part(a) and part(b) not in ALLOWED[part(a)]
    ]
    assert wrong == []


def test_the_checker_sees_a_cycle_and_a_wrong_floor():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert part("dsq.quantize.gptq") == "dsq.quantize"
    assert "dsq.run" not in ALLOWED[part("dsq.eval.gates")]


def test_every_package_is_installed():
    """pyproject's ``packages`` names every folder of the package, so a non-editable install has them all."""
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert found == declared
