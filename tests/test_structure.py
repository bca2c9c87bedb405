"""The house's rules, checked on every module of `featopt/` (docs/extending.md, "Where things live").

Imports point down the layers below: a module may import its own package and anything in a lower
layer, never a higher layer nor a sibling package of its own layer. There is no import circle,
no module imports another module's private name, and none sets another object's private attribute.
Every import statement counts, also those inside functions (a lazy import is still an arrow).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "featopt"

#: Lowest first. Each entry is a module or a package (all its modules); a package's own modules may
#: import each other (without circles).
LAYERS = [
    ["featopt.version", "featopt.errors"],
    ["featopt.interrupt", "featopt.cache", "featopt.memory", "featopt.atomic"],  # foundations: signals, cache
    # folders, memory checks, atomic writes
    ["featopt.models"],  # the only code that knows a model's internals, and the feature maps on a site
    ["featopt.results"],  # one record per problem, written atomically
    ["featopt.specs", "featopt.data", "featopt.plots"],  # feature specs, corpora, figures
    ["featopt.objectives", "featopt.runs"],  # what is scored; how a run is set up (Lightning, folders, handles)
    ["featopt.interventions"],  # causal edits the methods share
    ["featopt.weights"],  # the methods, in the order they may build on one another
    ["featopt.gradient", "featopt.discrete"],
    ["featopt.dictionaries"],
    ["featopt.feature_flow"],
    ["featopt.attribution"],  # attribution graphs over transcoders
    ["featopt.commands"],  # one config + run + formatter per command, one registry
    ["featopt.api"],  # the commands as functions, built from the registry
    ["featopt.cli", "featopt.search", "featopt.sae", "featopt.flow", "featopt.neurons", "featopt.graph"],  # entry points,
    ["featopt", "featopt.__main__"],  # both built from the registry
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _group(module: str) -> tuple[int, str]:
    """`(layer, entry)`: the most specific entry of LAYERS that holds `module`."""
    best = None
    for layer, entries in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and entry != "featopt" or module == entry == "featopt":
                if best is None or len(entry) > len(best[1]):
                    best = (layer, entry)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_structure.py")
    return best


def _imports(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """`(line, imported module, names)` for every featopt import of `module`, resolved to modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "featopt"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "featopt":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            others = [n for n in names if f"{base}.{n}" not in MODULES]
            if others or not submodules:  # `from featopt import memory` imports the submodule, not the package's names
                out.append((node.lineno, base, others))
            out += [(node.lineno, sub, []) for sub in submodules]
    return out


def _edges() -> dict[str, set[str]]:
    return {m: {target for _, target, _ in _imports(m, p) if target in MODULES and target != m} for m, p in MODULES.items()}


def test_every_module_is_in_a_layer():
    for module in MODULES:
        _group(module)


def test_imports_point_down():
    wrong = []
    for module, path in MODULES.items():
        layer, entry = _group(module)
        for line, target, _ in _imports(module, path):
            if target not in MODULES:
                continue
            t_layer, t_entry = _group(target)
            if t_entry == entry:
                continue
            if t_layer > layer or (t_layer == layer and t_entry != entry):
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target} ({t_entry}, layer {t_layer}) "
                             f"from {entry} (layer {layer})")
    assert not wrong, "imports that do not point down:\n" + "\n".join(wrong)


def test_no_import_circles():
    edges, state, cycles = _edges(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    # A package importing its own submodule in __init__ while they import the package's names is
    # how Python packages work; a circle is two modules that need each other.
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_no_private_names_across_modules():
    wrong = []
    for module, path in MODULES.items():
        for line, target, names in _imports(module, path):
            for name in names:
                if name.startswith("_") and not name.startswith("__") and target != module:
                    wrong.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}.{name}")
    assert not wrong, "private names imported across modules:\n" + "\n".join(wrong)


def test_no_private_attributes_set_from_outside():
    wrong = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                    if (isinstance(t, ast.Attribute) and t.attr.startswith("_") and not t.attr.startswith("__")
                            and not (isinstance(t.value, ast.Name) and t.value.id in ("self", "cls", "view", "out", "copy"))):
                        wrong.append(f"{path.relative_to(ROOT.parent)}:{t.lineno} sets {ast.unparse(t)}")
    assert not wrong, "private attributes set from outside their class:\n" + "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_stay_readable(module):
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= 350, f"{MODULES[module].relative_to(ROOT.parent)} has {lines} lines: split it (350 at most)"
