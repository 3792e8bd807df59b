"""The package's layering: each module imports only modules of its own layer or of the layers below it, there is no
import cycle (lazy imports inside functions included), and the core needs nothing but NumPy."""

import ast
import sys
from pathlib import Path

import reffuse

PACKAGE = Path(reffuse.__file__).parent

# Lowest first; a module may import from its own layer and from every layer before it.
LAYERS = [("reffuse.errors", "reffuse.records", "reffuse.stats", "reffuse.files", "reffuse.outputs", "reffuse.options",
           "reffuse.progress", "reffuse.optional"),
          ("reffuse.core",),
          ("reffuse.formats",),
          ("reffuse.evaluation",),
          ("reffuse.training",),
          ("reffuse.method",),
          ("reffuse.speed",),
          ("reffuse.tp",),
          ("reffuse.experiments",),
          ("reffuse.plots",),
          ("reffuse.commands", "reffuse.cli", "reffuse.__main__"),
          ("reffuse",)]  # the top-level API, above everything


def module_name(path: Path) -> str:
    parts = ("reffuse",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(reffuse modules, other top-level packages) that a file imports anywhere in it."""
    own, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; reffuse imports are absolute"
            names = [node.module]
            if node.module == "reffuse" or node.module.startswith("reffuse."):
                # `from reffuse.x import y` may name a module y
                names += [f"{node.module}.{a.name}" for a in node.names
                          if (PACKAGE / Path(*f"{node.module}.{a.name}".split(".")[1:])).with_suffix(".py").exists()
                          or (PACKAGE / Path(*f"{node.module}.{a.name}".split(".")[1:]) / "__init__.py").exists()]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            (own if name == "reffuse" or name.startswith("reffuse.") else other).add(name)
    return own, {n.split(".")[0] for n in other}


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_module_imports_a_higher_layer():
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, (targets, _) in GRAPH.items() for t in targets if layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    edges = {m: {t for t in targets if t in GRAPH and t != m} for m, (targets, _) in GRAPH.items()}
    for m in edges:  # a package's modules are imported through it only when named; drop the parent edges
        edges[m] = {t for t in edges[m] if not m.startswith(t + ".")}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_core_needs_numpy_only():
    stdlib = set(sys.stdlib_module_names)
    for m, (_, others) in GRAPH.items():
        if layer_of(m) <= 1:
            assert others <= stdlib | {"numpy", "__future__"}, f"{m} imports {sorted(others - stdlib)}"
