"""The seams of the project's Python packages, read from their source (no import needed): the SDK
(``rlfleet``), the agents (``rlfleet_agents``), the Pulumi programs' packages (``rlfleet_cloud``,
``rlfleet_aws``, ``rlfleet_gcp``) and the Ansible filter plugins (``rlfleet_hardening``):

- no module reaches a private name of another: ``from m import _x``, ``m._x`` on an imported
  module of these packages, or ``obj._x`` where ``_x`` is defined in another module (imports inside
  functions count too; private *modules* such as ``rlfleet._netns`` are package-internal and may
  be imported, their private names may not);
- the module-level imports among these modules have no cycle (``if TYPE_CHECKING:`` blocks and
  imports inside functions excluded: they run after every module is loaded);
- ``<target>.kind == ...`` (or ``!=``, ``in``) is written in the provisioner registry only.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# a package directory (its modules are named from its parent) or a plain plugin directory (its
# files are top-level modules, as Ansible loads them)
SOURCES = [
    REPO / "sdk" / "rlfleet",
    REPO / "agents" / "rlfleet_agents",
    REPO / "infra_cloud" / "shared" / "rlfleet_cloud",
    REPO / "infra_cloud" / "aws" / "rlfleet_aws",
    REPO / "infra_cloud" / "gcp" / "rlfleet_gcp",
    REPO / "ansible" / "filter_plugins",
]
REGISTRY = "rlfleet.provisioners.registry"


def _read(sources: list[Path]) -> tuple[dict[str, ast.Module], set[str]]:
    """Every module below ``sources`` by dotted name, and the names that are packages."""
    modules: dict[str, ast.Module] = {}
    packages: set[str] = set()
    for src in sources:
        is_pkg = (src / "__init__.py").exists()
        root = src.parent if is_pkg else src
        for p in sorted(src.rglob("*.py") if is_pkg else src.glob("*.py")):
            parts = list(p.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
                packages.add(".".join(parts))
            modules[".".join(parts)] = ast.parse(p.read_text(), filename=str(p))
    return modules, packages


MODULES, PACKAGES = _read(SOURCES)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".")
    base = base if mod in PACKAGES else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _defined_names(tree: ast.Module) -> set[str]:
    """Every private name a module defines: functions, classes, attributes it assigns (self._x too)."""
    out: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, ast.alias):
            out.add((n.asname or n.name).split(".")[0])
    return {x for x in out if _is_private(x)}


def private_reaches(modules: dict[str, ast.Module]) -> list[str]:
    ours = tuple({m.split(".")[0] for m in modules})  # the top-level packages being checked

    def is_ours(name: str) -> bool:
        return name.split(".")[0] in ours

    found = []
    for mod, tree in modules.items():
        own = _defined_names(tree)
        module_aliases: dict[str, str] = {}  # local name -> module of ours it is bound to
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                for a in n.names:
                    if is_ours(a.name):
                        module_aliases[a.asname or a.name] = a.name
            elif isinstance(n, ast.ImportFrom):
                src = _resolve(mod, n)
                for a in n.names:
                    if f"{src}.{a.name}" in modules:
                        module_aliases[a.asname or a.name] = f"{src}.{a.name}"
                    elif is_ours(src) and _is_private(a.name):
                        found.append(f"{mod}:{n.lineno}: from {src} import {a.name}")
        for n in ast.walk(tree):
            if not (isinstance(n, ast.Attribute) and _is_private(n.attr)):
                continue
            base = n.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if isinstance(base, ast.Name) and base.id in module_aliases:
                if module_aliases[base.id] != mod:
                    found.append(f"{mod}:{n.lineno}: {base.id}.{n.attr} (private name of {module_aliases[base.id]})")
                continue
            if isinstance(base, ast.Attribute) and ast.unparse(base) in module_aliases.values():
                found.append(f"{mod}:{n.lineno}: {ast.unparse(n)}")
                continue
            if n.attr not in own and any(n.attr in _defined_names(t) for m, t in modules.items() if m != mod):
                found.append(f"{mod}:{n.lineno}: {ast.unparse(n)} (private name defined in another module)")
    return found


def _module_level_imports(mod: str, tree: ast.Module, *, in_functions: bool = False) -> set[str]:
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for st in body:
            if in_functions and isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(st.body)
            if isinstance(st, ast.Import):
                out.update(a.name for a in st.names)
            elif isinstance(st, ast.ImportFrom):
                src = _resolve(mod, st)
                out.add(src)
                out.update(f"{src}.{a.name}" for a in st.names)
            elif isinstance(st, ast.If):
                test = ast.unparse(st.test)
                if "TYPE_CHECKING" not in test:
                    visit(st.body)
                visit(st.orelse)
            elif isinstance(st, (ast.Try, ast.With)):
                visit(st.body)
                for h in getattr(st, "handlers", []):
                    visit(h.body)
                visit(getattr(st, "orelse", []))
                visit(getattr(st, "finalbody", []))
            elif isinstance(st, ast.ClassDef):
                visit(st.body)

    visit(tree.body)
    # importing a.b.c also runs a.b's __init__: an edge to every parent package that is not one of
    # the importer's own packages (those are already being initialised when it runs)
    own_pkgs = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
    edges = set()
    for name in out:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            cand = ".".join(parts[:i])
            if cand in MODULES and cand != mod and cand not in own_pkgs:
                edges.add(cand)
    return edges


def import_cycles(modules: dict[str, ast.Module], *, in_functions: bool = False) -> list[list[str]]:
    graph = {m: _module_level_imports(m, t, in_functions=in_functions) & set(modules) for m, t in modules.items()}
    cycles, state, stack = [], dict.fromkeys(graph, 0), []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for nxt in sorted(graph[m]):
            if state[nxt] == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif state[nxt] == 0:
                dfs(nxt)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if state[m] == 0:
            dfs(m)
    return cycles


def kind_comparisons(modules: dict[str, ast.Module]) -> list[str]:
    """``X.kind == 'aws'``-style tests on a target's kind, outside the registry."""
    kinds = {"local", "aws", "gcp", "onprem", "ray"}
    found = []
    for mod, tree in modules.items():
        if mod == REGISTRY:
            continue
        for n in ast.walk(tree):
            if not isinstance(n, ast.Compare):
                continue
            sides = [n.left, *n.comparators]
            consts = set()
            for s in sides:
                if isinstance(s, ast.Constant) and isinstance(s.value, str):
                    consts.add(s.value)
                elif isinstance(s, (ast.Tuple, ast.List, ast.Set)):
                    consts |= {e.value for e in s.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            names = {ast.unparse(s) for s in sides}
            if consts & kinds and any(x == "kind" or x.endswith(".kind") for x in names):
                found.append(f"{mod}:{n.lineno}: {ast.unparse(n)}")
    return found


def test_the_checks_see_what_they_look_for() -> None:
    """The three checks flag a planted example of each (they could fail)."""
    planted = {
        "rlfleet.a": ast.parse("import rlfleet.b\nfrom rlfleet.b import _hidden\n"
                               "def f(t):\n    from rlfleet import b\n    return b._x, t.store._y()\n"),
        "rlfleet.b": ast.parse("import rlfleet.a\n_hidden = 1\n_x = 2\ndef _y():\n    if t.kind == 'aws': pass\n"),
    }
    reaches = private_reaches(planted)
    assert any("import _hidden" in r for r in reaches) and any("b._x" in r for r in reaches)
    assert any("store._y" in r for r in reaches)
    global MODULES
    saved, MODULES = MODULES, planted
    try:
        assert import_cycles(planted)
    finally:
        MODULES = saved
    assert kind_comparisons(planted) == ["rlfleet.b:5: t.kind == 'aws'"]


def test_the_private_name_check_sees_reaches_across_the_packages() -> None:
    """Every package is read, and a reach from one package into another is flagged: the agents
    into the SDK, a filter plugin into the Pulumi programs' settings, a cloud program into the
    shared package through an attribute."""
    assert {m.split(".")[0] for m in MODULES} == {
        "rlfleet", "rlfleet_agents", "rlfleet_cloud", "rlfleet_aws", "rlfleet_gcp", "rlfleet_hardening"}
    planted = {
        "rlfleet.b": ast.parse("_hidden = 1\n"),
        "rlfleet_agents.x": ast.parse("from rlfleet.b import _hidden\n"),
        "rlfleet_cloud.settings": ast.parse("_V4_MAPPED = 1\n"),
        "rlfleet_hardening": ast.parse("import rlfleet_cloud.settings as s\nv = s._V4_MAPPED\n"),
        "rlfleet_aws.y": ast.parse("def f(cfg):\n    return cfg._V4_MAPPED\n"),
    }
    assert sorted(r.split(":")[0] for r in private_reaches(planted)) == [
        "rlfleet_agents.x", "rlfleet_aws.y", "rlfleet_hardening"]


def test_no_module_imports_a_private_name_of_another() -> None:
    assert private_reaches(MODULES) == []


def test_no_import_cycle_among_the_packages() -> None:
    assert import_cycles(MODULES) == []


def test_targets_paths_and_provisioners_import_no_circle_even_inside_functions() -> None:
    """The local target and the targets file used to import each other (inside functions);
    paths.py is the leaf both read now."""
    part = {m: t for m, t in MODULES.items()
            if m in ("rlfleet.targets", "rlfleet.paths", "rlfleet.local")
            or m.startswith(("rlfleet.provisioners", "rlfleet.teardown"))}
    assert import_cycles(part, in_functions=True) == []


def test_target_kinds_are_compared_only_in_the_provisioner_registry() -> None:
    assert kind_comparisons(MODULES) == []
