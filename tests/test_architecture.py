"""The floor plan holds: no import cycle among losscmp's modules, counting the imports
inside functions, and the pytest plugin loads without torch."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import losscmp

PACKAGE = Path(losscmp.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    """Imports under ``if TYPE_CHECKING:``: annotations only, never executed."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the losscmp modules it imports, at any depth of the file (functions included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                # ``from . import x`` names a submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions():
    # The check below is only worth something if it reads function-level imports.
    graph = import_graph()
    assert "losscmp.testing" in graph["losscmp.pytest_plugin"]  # imported inside the hooks only
    assert "losscmp.model" in graph["losscmp.audit"]


def test_cycles_are_found_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_among_losscmp_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (imports inside functions count): " + "; ".join(" <-> ".join(c) for c in found)


def private_imports() -> list[str]:
    """``from .x import _name`` across losscmp modules, at any depth: a name another module
    needs is public in its home (a submodule imported as a module, or a dunder, is not a
    private name)."""
    modules = _modules()
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            if base != "losscmp" and not base.startswith("losscmp."):
                continue
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and f"{base}.{alias.name}" not in modules:
                    found.append(f"{name} imports {alias.name} from {base}")
    return found


def test_no_module_imports_a_private_name_of_another():
    found = private_imports()
    assert not found, "private names imported across modules (make them public in their home): " + "; ".join(found)


def test_the_private_import_check_sees_one(tmp_path, monkeypatch):
    # The check above is only worth something if it would see a violation.
    fake = tmp_path / "losscmp"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("def f():\n    from .b import _secret, public\n")
    (fake / "b.py").write_text("from . import _standalone\nfrom ._version import __version__\n_secret = public = 1\n")
    (fake / "_standalone.py").write_text("")
    (fake / "_version.py").write_text("__version__ = '0'\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert private_imports() == ["losscmp.a imports _secret from losscmp.b"]


def test_the_model_imports_nothing_of_losscmp_but_errors():
    assert import_graph()["losscmp.model"] <= {"losscmp.errors"}


def test_the_pytest_plugin_does_not_import_torch():
    # pytest loads the plugin in every project that merely has losscmp installed.
    code = "import losscmp.pytest_plugin, sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_public_names_still_import_from_the_package():
    code = ("import losscmp, losscmp.audit as a; from losscmp import audit, Case, Settings, Kind; "
            "assert callable(audit) and a is audit and Case.__module__ == 'losscmp.model' and losscmp.Spec")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_readme_layout_names_every_module():
    """The README's module table is the map a newcomer reads: a module it leaves out is
    a module nobody finds.  Each one must have a row (names in backticks in the first
    column)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()  # the checkout's, wherever losscmp is installed
    table = readme.split("| module | what flows in and out |", 1)[1].split("\n\n", 1)[0]
    listed = {name for row in table.splitlines() if row.startswith("| `") for name in re.findall(r"`([\w.]+)`", row.split("|")[1])}
    # Modules of a subpackage go by their dotted name (``explain.oracle``), the package by its own.
    files = {".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__") for path in PACKAGE.rglob("*.py")}
    assert files - listed == set(), f"modules missing from the README's Layout table: {sorted(files - listed)}"
    assert listed - files == set(), f"the README's Layout table names modules that do not exist: {sorted(listed - files)}"


def _domain_switches(path: Path) -> list[str]:
    """Comparisons of something named ``domain`` with a string (``domain == "unit"``,
    ``a.domain in ("unit", "image")``): behaviour that belongs in the domain table."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        named = any((isinstance(n, ast.Name) and n.id == "domain") or (isinstance(n, ast.Attribute) and n.attr == "domain") for n in sides)
        strings = any(isinstance(c, ast.Constant) and isinstance(c.value, str) for n in sides for c in ast.walk(n))
        if named and strings:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_domain_switches_are_found_when_there_is_one(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f(a, domain):\n    if a.domain in ('unit', 'image'):\n        return 1\n    return domain == 'positive'\n")
    assert [s.split(": ", 1)[0] for s in _domain_switches(sample)] == ["sample.py:2", "sample.py:4"]


def test_the_explanation_leaves_domain_behaviour_to_the_domain_table():
    """Adding a domain is one row of ``domains.DOMAINS``: the explanation's finite-difference
    steps, domain check and descent projection read the row, never switch on its name."""
    found = [s for path in sorted((PACKAGE / "explain").glob("*.py")) for s in _domain_switches(path)]
    assert not found, "domain switches outside the domain table: " + "; ".join(found)


def test_the_explain_package_has_one_module_per_analysis():
    names = {path.stem for path in (PACKAGE / "explain").glob("*.py")}
    assert {"oracle", "consistency", "relation", "impact", "signatures", "stage", "render"} <= names, sorted(names)
