"""The dependency arrow between the two packages runs one way: ``rlfleet_agents`` may import
``rlfleet``; ``rlfleet`` never imports ``rlfleet_agents``. Read from the source of every module
under sdk/rlfleet, imports inside functions and ``if TYPE_CHECKING:`` blocks included, and
``importlib.import_module("rlfleet_agents...")`` / ``__import__`` calls too. Naming the agents
package in a *string* the SDK hands to someone else (Ray's runtime_env plugin class, the job
entrypoint ``python -m rlfleet_agents.run``, ``find_spec``) is not an import and is allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "sdk" / "rlfleet"
AGENTS_PKG = "rlfleet_agents"


def _names_agents(module: str | None) -> bool:
    return module is not None and (module == AGENTS_PKG or module.startswith(AGENTS_PKG + "."))


def agent_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the agents package anywhere in ``tree``."""
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            found += [(n.lineno, a.name) for a in n.names if _names_agents(a.name)]
        elif isinstance(n, ast.ImportFrom) and not n.level and _names_agents(n.module):
            found.append((n.lineno, str(n.module)))
        elif isinstance(n, ast.Call) and n.args and isinstance(n.args[0], ast.Constant):
            fn = n.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            arg = n.args[0].value
            if name in ("import_module", "__import__") and isinstance(arg, str) and _names_agents(arg):
                found.append((n.lineno, arg))
    return found


def test_sdk_never_imports_the_agents_package() -> None:
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 20  # the walk found the package
    offenders = [
        f"{p.relative_to(PKG.parent)}:{line} imports {mod}"
        for p in files
        for line, mod in agent_imports(ast.parse(p.read_text(), filename=str(p)))
    ]
    assert not offenders, "rlfleet must not import rlfleet_agents:\n" + "\n".join(offenders)


def test_the_check_sees_hidden_imports() -> None:
    """The walker catches every spelling the SDK could use (so the test above can fail)."""
    src = '''
import rlfleet_agents
def f():
    from rlfleet_agents.configs import validate_config
    import importlib
    importlib.import_module("rlfleet_agents.trainer")
    __import__("rlfleet_agents")
if TYPE_CHECKING:
    import rlfleet_agents.registry as r
PLUGIN = "rlfleet_agents.requirements_env.RequirementsPlugin"
importlib.util.find_spec("rlfleet_agents")
import rlfleet_agentsx
'''
    assert sorted(line for line, _ in agent_imports(ast.parse(src))) == [2, 4, 6, 7, 9]
