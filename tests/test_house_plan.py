"""The house plan's structural bars (issue 11, ARCHITECTURE.md), read statically with ``ast``.

Every ``.py`` file of ``fastbn/`` and ``kernels/`` is a module of the package
(``kernels/X.py`` is ``fastbn.kernels.X``, a package's ``__init__.py`` is the
package).  An import is an edge from the importing module to the module it
names: ``from P import n`` goes to ``P.n`` where that is a module, else to
``P``; ``import a.b`` goes to ``a.b``; ``importlib.import_module`` of a string
constant, or of a value of a module-level dict of strings (the backend and
family registries), goes to each module it may load.  Imports anywhere count:
at module level, and inside functions (where they only run on a call).

* No import cycles: none at module level, and none that a function-level
  import closes.  A function-level import that is the only thing keeping a
  cycle out of the module-level graph is reported, with file:line, not hidden.
* No reach-ins: no module uses a name starting with ``_`` (not a dunder) that
  another module's file defines -- ``from M import _name`` or ``M._name`` --
  except between modules of the kernels package, and no module outside a
  package imports that package's private submodules (``fastbn.kernels._jit``
  is private to ``fastbn.kernels``; ``fastbn._source_tree`` to ``fastbn``).
* ``import fastbn`` does not import torch (only ``fastbn.torch`` does).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Package name -> its folder.
PACKAGES = {"fastbn": ROOT / "fastbn", "fastbn.kernels": ROOT / "kernels"}
KERNELS = "fastbn.kernels"

#: Cycles that a function-level import closes, found by this test and reported on
#: issue 11 (they are in other rooms' files): the modules of each -> how it closes.
KNOWN_CYCLES = {
}


def package_modules():
    """{module name: (path, is a package)} for every .py file of the package."""
    mods = {}
    for pkg, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if pkg == "fastbn" and parts[0] == "kernels":  # an installed layout's copy of kernels/
                continue
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts.pop()
            mods[".".join([pkg] + parts)] = (path, is_pkg)
    return mods


MODULES = package_modules()


def _private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _within(module, package):
    return module == package or module.startswith(package + ".")


class _Imports(ast.NodeVisitor):
    """The package-internal imports and private-name uses of one module."""

    def __init__(self, name, is_pkg):
        self.name = name
        self.package = name if is_pkg else name.rpartition(".")[0]
        self.depth = 0          # > 0 inside a function body
        self.edges = []         # (target module, line, "module" | "function" | "dynamic")
        self.private = []       # (line, what it uses)
        self.aliases = {}       # local name -> package module it is bound to
        self.str_dicts = {}     # module-level name -> the strings of a dict literal

    # -- where we are --------------------------------------------------------
    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef
    visit_Lambda = visit_FunctionDef

    def _kind(self):
        return "function" if self.depth else "module"

    # -- imports ---------------------------------------------------------------
    def _edge(self, target, node, kind=None):
        if target in MODULES and target != self.name:
            self.edges.append((target, node.lineno, kind or self._kind()))

    def _check_private_modules(self, module, node):
        """Each private component of ``module`` is visible only inside its package."""
        parts = module.split(".")
        for i in range(1, len(parts)):
            if _private(parts[i]) and not _within(self.name, ".".join(parts[:i])):
                self.private.append((node.lineno, f"private module {'.'.join(parts[:i + 1])}"))
                return

    def _private_name(self, module, name, node, how):
        allowed = module == self.name or (_within(module, KERNELS) and _within(self.name, KERNELS))
        if _private(name) and not allowed:
            self.private.append((node.lineno, how))

    def visit_Import(self, node):
        for alias in node.names:
            target = alias.name
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if not target:
                continue
            self._edge(target, node)
            self._check_private_modules(alias.name, node)
            if alias.asname:
                self.aliases[alias.asname] = target
            else:
                head = alias.name.partition(".")[0]
                if head in MODULES:
                    self.aliases[head] = head

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.package.split(".")
            base = base[:len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module
        if not _within(source, "fastbn"):
            return
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            if sub in MODULES:
                self._edge(sub, node)
                self._check_private_modules(sub, node)
                self.aliases[alias.asname or alias.name] = sub
            else:
                self._edge(source, node)
                self._check_private_modules(source, node)
                self._private_name(source, alias.name, node, f"from {source} import {alias.name}")

    def visit_Assign(self, node):
        if not self.depth and isinstance(node.value, ast.Dict):
            strings = [v.value for v in node.value.values
                       if isinstance(v, ast.Constant) and isinstance(v.value, str)]
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    self.str_dicts[t.id] = strings
        self.generic_visit(node)

    visit_AnnAssign = visit_Assign

    def visit_Call(self, node):
        f = node.func
        if (isinstance(f, ast.Attribute) and f.attr == "import_module" and isinstance(f.value, ast.Name)
                and f.value.id == "importlib" and node.args):
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self._edge(arg.value, node, "dynamic")
            elif isinstance(arg, ast.Subscript) and isinstance(arg.value, ast.Name):
                self.pending_dynamic.append((arg.value.id, node))
        self.generic_visit(node)

    # -- M._name -----------------------------------------------------------------
    def visit_Attribute(self, node):
        chain = []
        value = node
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if isinstance(value, ast.Name) and value.id in self.aliases:
            module = self.aliases[value.id]
            for attr in reversed(chain):
                if f"{module}.{attr}" in MODULES:
                    module = f"{module}.{attr}"
                    self._check_private_modules(module, node)
                    continue
                self._private_name(module, attr, node, f"{value.id}.{'.'.join(reversed(chain))}"
                                   f" ({module}.{attr})")
                break
            return   # the chain is handled whole
        self.generic_visit(node)

    def run(self, tree):
        self.pending_dynamic = []
        self.visit(tree)
        for dict_name, node in self.pending_dynamic:
            for target in self.str_dicts.get(dict_name, ()):
                self._edge(target, node, "dynamic")
        return self


@pytest.fixture(scope="module")
def scans():
    """{module: its _Imports} for every module of the package."""
    out = {}
    for name, (path, is_pkg) in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        out[name] = _Imports(name, is_pkg).run(tree)
    return out


def _where(importer, line):
    return f"{MODULES[importer][0].relative_to(ROOT)}:{line}"


def _cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, on, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph(scans, kinds):
    graph = {}
    for name, scan in scans.items():
        graph[name] = {t for t, _, kind in scan.edges if kind in kinds}
    return graph


def _hops(scans, comp, kinds):
    """{(importer, target): (line, kind)}: the first import of each edge inside ``comp``."""
    members, hops = set(comp), {}
    for name in comp:
        for target, line, kind in sorted(scans[name].edges, key=lambda e: e[1]):
            if target in members and kind in kinds:
                hops.setdefault((name, target), (line, kind))
    return hops


def _describe(scans, comp, kinds, through):
    """{cycle: text}: the shortest cycle through each import of a kind in ``through``
    inside ``comp``, as the tuple of its modules (starting from the first in sorted
    order) and one 'importer -> target  (file:line, kind)' line per hop."""
    hops = _hops(scans, comp, kinds)
    out = {}
    for (u, v), (line, kind) in sorted(hops.items()):
        if kind not in through:
            continue
        back = {v: None}                 # breadth-first from v back to u
        todo = [v]
        while todo and u not in back:
            a = todo.pop(0)
            for (x, y) in sorted(hops):
                if x == a and y not in back:
                    back[y] = a
                    todo.append(y)
        path = [u]                       # u, its predecessor, ..., v
        while path[-1] != v:
            path.append(back[path[-1]])
        cycle = [u] + path[::-1][:-1]    # u -> v -> ... -> u's predecessor (-> u)
        first = cycle.index(min(cycle))
        cycle = tuple(cycle[first:] + cycle[:first])
        out[cycle] = "\n".join(f"  {a} -> {b}  ({_where(a, hops[a, b][0])}, {hops[a, b][1]})"
                               for a, b in zip(cycle, cycle[1:] + cycle[:1]))
    return out


def test_the_scan_sees_the_package(scans):
    """The scan finds the rooms and the imports between them (so the bars below can fail)."""
    for room in ("fastbn", "fastbn.api", "fastbn.core", "fastbn.checks", "fastbn.layout",
                 "fastbn.dispatch", "fastbn.families", "fastbn.families.host", "fastbn.kernels",
                 "fastbn.kernels.cpu_numba", "fastbn.kernels._jit"):
        assert room in MODULES, room
    assert "fastbn.kernels._jit" in {t for t, _, _ in scans["fastbn.kernels.cpu_numba"].edges}
    assert "fastbn.api" in {t for t, _, _ in scans["fastbn"].edges}
    assert {"fastbn.kernels.cpu_numba", "fastbn.kernels.cpu_cython"} <= {
        t for t, _, kind in scans["fastbn.dispatch"].edges if kind == "dynamic"}


def test_the_checks_catch_what_they_look_for():
    """A cycle and each kind of reach-in, planted in code that is not the package's."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    code = ("from fastbn.kernels import _jit\nfrom fastbn.api import _x\nimport fastbn.core as c\n"
            "c._y()\nfrom fastbn.kernels import cpu_numba\ncpu_numba._moments_cf\n")
    uses = [what for _, what in _Imports("fastbn.layer", False).run(ast.parse(code)).private]
    assert len(uses) == 4, uses
    inside = _Imports("fastbn.kernels.cpu_cython", False).run(ast.parse(code)).private
    assert [what for _, what in inside] == ["from fastbn.api import _x", "c._y (fastbn.core._y)"]


def test_no_import_cycles_at_module_level(scans):
    cycles = _cycles(_graph(scans, {"module"}))
    assert not cycles, "import cycles at module level:\n" + "\n\n".join(
        text for comp in cycles for text in _describe(scans, comp, {"module"}, {"module"}).values())


def test_no_import_cycle_closed_by_a_function_level_import(scans):
    """A function-level (or importlib) import does not hide a cycle: each cycle that one
    closes is listed hop by hop (file:line), unless it is a known one (KNOWN_CYCLES),
    and a known one that is gone must leave the list."""
    kinds = {"module", "function", "dynamic"}
    found = {}
    for comp in _cycles(_graph(scans, kinds)):
        found.update(_describe(scans, comp, kinds, {"function", "dynamic"}))
    new = [text for cycle, text in found.items() if cycle not in KNOWN_CYCLES]
    assert not new, "import cycles closed by function-level imports:\n" + "\n\n".join(new)
    gone = sorted(set(KNOWN_CYCLES) - set(found))
    assert not gone, f"these cycles are gone: remove them from KNOWN_CYCLES: {gone}"


def test_no_private_names_from_other_modules(scans):
    found = [f"  {_where(name, line)}  {what}"
             for name, scan in scans.items() for line, what in scan.private]
    assert not found, ("names starting with _ used from another module's file "
                       "(outside kernels -> kernels):\n" + "\n".join(found))


@pytest.mark.integration
def test_import_fastbn_does_not_import_torch():
    proc = subprocess.run(
        [sys.executable, "-c", "import fastbn, sys; assert 'torch' not in sys.modules, 'torch imported'"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
