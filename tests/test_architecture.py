"""The package's import rules (docs/architecture.md), checked on the source with ast.

- no import cycles: none at all among module-level imports, and none among all imports
  (those inside functions too) except the edges listed in ``CYCLE_EXEMPT``;
- a module imports a private name (leading underscore) of another numlora module, or a
  private module, only from the designated internal modules (``INTERNAL``);
- the CUDA backend (``numlora.cuda``) is loaded by ``numlora._dispatch`` (by name) and
  imported by no module outside it;
- no public function of the functional modules branches on the device itself (the one
  dispatch point is ``numlora._dispatch``).

``EXEMPT`` lists the modules that may still break the private-name and CUDA-import rules
while they are being redesigned (none now); an entry goes as soon as its module no longer
needs it (a test fails on an exemption that is not needed).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "numlora"

#: The designated internal modules: every numlora module may import their private names
#: (and the modules themselves, whose names start with an underscore).
INTERNAL = (
    "numlora._backward",
    "numlora._code8",
    "numlora._config",
    "numlora._dispatch",
    "numlora._nf4_products",
    "numlora._progress",
    "numlora._scratch",
    "numlora._tables",
    "numlora._validate",
    "numlora.cuda._launch",
    "numlora.io._files",
    "numlora.kernels",  # and numlora.kernels.* (the CPU kernels, numlora.kernels._jit, _simd)
)

#: Modules exempt from the private-name and CUDA-import rules, each with the reason, while
#: it moves to the public functional API and the designated internals (none now; a new
#: entry must say why, and goes as soon as the module no longer needs it).
EXEMPT = set()

#: Import edges (importer, imported) allowed to close a cycle through imports inside
#: functions.
CYCLE_EXEMPT = set()

#: The functional modules: their public functions are routed by numlora._dispatch and
#: never test where their arrays live.
FUNCTIONAL = ("numlora.ops", "numlora.nf4", "numlora.dora", "numlora.dropout", "numlora.rng", "numlora.train",
              "numlora.combine")


def _modules(root: Path) -> dict:
    """module name -> path, for every .py file of the package under ``root``."""
    mods = {}
    for path in sorted((root / PKG).rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _is_package(mods, name) -> bool:
    return name in mods and mods[name].name == "__init__.py"


def _resolve(mods, importer, node):
    """The numlora modules an ImportFrom / Import node imports, as ``(module, names)``
    pairs: ``names`` are the imported names that are not submodules."""
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == PKG or alias.name.startswith(PKG + "."):
                out.append((alias.name, []))
        return out
    if node.level:
        base = importer.split(".") if _is_package(mods, importer) else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not (target == PKG or target.startswith(PKG + ".")):
        return out
    names = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        if sub in mods:
            out.append((sub, []))
        else:
            names.append(alias.name)
    if names or not out:
        out.append((target, names))
    return out


def import_graph(root: Path = ROOT):
    """``(mods, edges)``: edges is a list of ``(importer, imported, names, module_level)``
    over numlora's modules; an import of ``numlora.a.b`` also imports the package
    ``numlora.a`` (its ``__init__`` runs first; the root package is left out)."""
    mods = _modules(root)
    edges = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lazy_nodes = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                for sub in ast.walk(node):
                    if sub is not node:
                        lazy_nodes.add(id(sub))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            top = id(node) not in lazy_nodes
            for target, names in _resolve(mods, name, node):
                parts = target.split(".")
                for k in range(2, len(parts)):  # the parent packages, not numlora itself
                    parent = ".".join(parts[:k])
                    if parent != name and not name.startswith(parent + "."):
                        edges.append((name, parent, [], top))
                if target != name:
                    edges.append((name, target, names, top))
    return mods, edges


def cycles(nodes, edges) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    succ = {n: set() for n in nodes}
    for a, b in edges:
        if a in succ and b in succ:
            succ[a].add(b)
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(succ[v]):
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
                comps.append(sorted(comp))

    for n in sorted(succ):
        if n not in index:
            visit(n)
    return comps


def _within(module: str, names) -> bool:
    return any(module == m or module.startswith(m + ".") for m in names)


def _internal(module: str) -> bool:
    return _within(module, INTERNAL)


def _exempt(module: str) -> bool:
    return _within(module, EXEMPT)


def _private(module: str) -> bool:
    return any(part.startswith("_") and part != "__init__" for part in module.split(".")[1:])


def private_imports(mods, edges):
    """``(importer, module, name)`` for every private name, or private module, imported
    from a numlora module that is not a designated internal one."""
    bad = set()
    for importer, target, names, _ in edges:
        if _private(target) and not _internal(target) and not _private_home(importer, target):
            bad.add((importer, target, "<module>"))
        if _internal(target):
            continue
        for n in names:
            if n.startswith("_") and not n.startswith("__"):
                bad.add((importer, target, n))
    return sorted(bad)


def _private_home(importer, target) -> bool:
    """A private module imported from inside its own package (numlora.io.x -> numlora.io._y)."""
    return importer.rsplit(".", 1)[0] == target.rsplit(".", 1)[0]


def test_no_import_cycles_at_module_level():
    mods, edges = import_graph()
    assert cycles(mods, [(a, b) for a, b, _, top in edges if top]) == []


def test_no_import_cycles_counting_imports_inside_functions():
    mods, edges = import_graph()
    found = cycles(mods, [(a, b) for a, b, _, _ in edges if (a, b) not in CYCLE_EXEMPT])
    assert found == [], "import cycles (an import inside a function counts too): " + repr(found)


def test_private_names_come_only_from_the_designated_internal_modules():
    mods, edges = import_graph()
    bad = [t for t in private_imports(mods, edges) if not _exempt(t[0])]
    assert bad == [], "\n".join(f"{a} imports {n} from {b}" for a, b, n in bad)


def test_the_cuda_backend_is_loaded_only_through_dispatch():
    from numlora import _dispatch

    assert _dispatch.BACKENDS["cuda"] == "numlora.cuda"
    mods, edges = import_graph()
    users = sorted({a for a, b, _, _ in edges
                    if (b == "numlora.cuda" or b.startswith("numlora.cuda."))
                    and not a.startswith("numlora.cuda") and not _exempt(a)})
    assert users == []


def stale_exemptions(mods, edges, exempt) -> list:
    """The entries of ``exempt`` whose modules no longer break a rule (one for a module not
    yet committed is kept)."""
    bad_modules = {a for a, _, _ in private_imports(mods, edges)}
    bad_modules |= {a for a, b, _, _ in edges if b.startswith("numlora.cuda") and not a.startswith("numlora.cuda")}
    return sorted(m for m in exempt if any(_within(x, [m]) for x in mods)
                  and not any(_within(b, [m]) for b in bad_modules))


def test_the_exemptions_are_still_needed():
    """An exemption whose module no longer breaks a rule goes."""
    mods, edges = import_graph()
    stale = stale_exemptions(mods, edges, EXEMPT)
    assert stale == [], f"remove these from EXEMPT: {stale}"
    all_cycles = cycles(mods, [(a, b) for a, b, _, _ in edges])
    for a, b in CYCLE_EXEMPT:
        assert any(a in c and b in c for c in all_cycles), f"remove {(a, b)} from CYCLE_EXEMPT"


def test_a_stale_exemption_is_found():
    """The check above is not vacuous: the layers and the bank, exempt while they were split,
    follow the rules now, so exempting them is reported; a module that breaks a rule (an
    edge added here) keeps its exemption."""
    mods, edges = import_graph()
    assert stale_exemptions(mods, edges, {"numlora.layers", "numlora.multi"}) == ["numlora.layers", "numlora.multi"]
    edges = edges + [("numlora.layers.nf4", "numlora.nf4", ["_check_tensor"], True)]
    assert stale_exemptions(mods, edges, {"numlora.layers", "numlora.multi"}) == ["numlora.multi"]


_DEVICE_TESTS = {"on_device", "_on_device", "is_device_array", "_gpu", "where", "as_cuda", "cuda_module"}


def device_branches(root: Path = ROOT, modules=FUNCTIONAL):
    """``(module, function)`` for every public function or method of ``modules`` whose body
    tests where arrays live (calls a device test, compares a ``_device`` attribute, checks
    for a DeviceNF4Tensor, or imports numlora.cuda)."""
    mods = _modules(root)
    found = []
    for mod in modules:
        if mod not in mods:
            continue
        tree = ast.parse(mods[mod].read_text(encoding="utf-8"))
        for fn, qual in _functions(tree):
            if any(part.startswith("_") and not part.startswith("__") for part in qual.split(".")):
                continue
            if _tests_device(fn):
                found.append((mod, qual))
    return found


def _functions(tree):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, node.name
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield sub, f"{node.name}.{sub.name}"


def _tests_device(fn) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in _DEVICE_TESTS:
                return True
            if name == "isinstance" and any(isinstance(a, ast.Name) and a.id == "DeviceNF4Tensor"
                                            for a in ast.walk(node)):
                return True
        if isinstance(node, ast.Attribute) and node.attr == "_device":
            return True
        if isinstance(node, ast.ImportFrom) and ("cuda" in (node.module or "").split(".")
                                                 or any(a.name == "cuda" for a in node.names)):
            return True
    return False


def test_no_public_function_of_the_functional_modules_branches_on_the_device():
    assert device_branches() == []


def test_the_checks_see_the_package():
    """The graph has the modules and edges it should (a broken walker passes everything)."""
    mods, edges = import_graph()
    assert {"numlora.ops", "numlora.nf4", "numlora._dispatch", "numlora.cuda.ops", "numlora.io.bnb"} <= set(mods)
    pairs = {(a, b) for a, b, _, _ in edges}
    assert ("numlora.ops", "numlora._dispatch") in pairs
    assert ("numlora.nf4", "numlora.io.bnb") in pairs and ("numlora.nf4", "numlora.io") in pairs
    assert ("numlora.cuda.ops", "numlora.dropout") in pairs
    assert cycles(["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "a")]) == [["a", "b", "c"]]
