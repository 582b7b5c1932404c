"""The package's shape: no import cycle between its folders, and shared machinery that
reaches a family only through the registry."""

import ast
from pathlib import Path

from mmpeft.families import FAMILY_PACKAGES, families

PACKAGE = Path(__file__).resolve().parents[2] / "mmpeft"
FAMILY_NAMES = {p.removeprefix("mmpeft.") for p in FAMILY_PACKAGES}


def _node(module: str) -> str:
    """A folder of mmpeft (`mmpeft.llava`), or a module at its top (`mmpeft.loading`)."""
    parts = module.split(".")
    if len(parts) > 1 and (PACKAGE / parts[1]).is_dir():
        return ".".join(parts[:2])
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _imports() -> dict[str, set[str]]:
    """Every module of mmpeft and the mmpeft modules it imports, at any depth of its code."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        found[module] = {n for n in names if n == "mmpeft" or n.startswith("mmpeft.")}
    return found


def _folder_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, names in _imports().items():
        src = _node(module)
        graph.setdefault(src, set()).update(_node(n) for n in names if _node(n) != src and n != "mmpeft")
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*trail[trail.index(nxt):], nxt] if nxt in trail else [node, nxt]
            if nxt not in state:
                found = visit(nxt, [*trail, nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_cycle_between_folders():
    assert _cycle(_folder_graph()) is None, " -> ".join(_cycle(_folder_graph()))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_shared_machinery_names_no_family():
    """Families may build on each other (MiniGPT-5 on LLaVA's assembly); everything else
    reads the registry."""
    offenders = []
    for module, names in _imports().items():
        if _node(module).removeprefix("mmpeft.") in FAMILY_NAMES:
            continue
        offenders += [f"{module} imports {n}" for n in names if _node(n).removeprefix("mmpeft.") in FAMILY_NAMES]
    assert offenders == []


def test_every_family_package_is_registered_and_complete():
    registered = families()
    assert set(registered) == FAMILY_NAMES
    recipes = [r for f in registered.values() for r in f.recipes]
    assert len(recipes) == len(set(recipes))
    shipped = {p.stem for p in (PACKAGE.parent / "recipes").glob("*.py")} - {"__init__"}
    for family in registered.values():
        assert set(family.recipes) <= shipped, family.name
        assert (family.export is None) == bool(family.no_export), family.name
        assert set(family.card_metrics) <= set(family.recipes) and set(family.figures) <= set(family.recipes)
