"""The house: layers you can see in the folder tree, read from the code's own imports.

- every module of ``converter/`` and ``passes/`` sits in one layer (its folder);
- an import reaches only its own layer or a lower one, never up;
- the modules import each other in no circle (imports inside functions count too);
- an import inside a function is there only to keep something optional or slow unloaded,
  for one of the reasons in ``LAZY`` (a top-level import otherwise);
- the README's architecture table is the one :func:`architecture_table` renders from this
  file and the packages' docstrings (``python tests/test_layers.py`` rewrites it).
"""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top: a module may import its own layer and every layer below it.
LAYERS = (
    "converter/core",
    "passes",
    "converter/check",
    "converter/torch",
    "converter/recipes",
    "converter/search",
    "converter/commands",
    "converter",
)

# What may be imported inside a function instead of at the top of the module, and why.
LAZY = {
    "torch": "the torch extra: only export and shrink need it",
    "torch_pruning": "the shrink extra",
    "onnxscript": "the torch extra (the dynamo exporter)",
    "safetensors": "the torch extra (.safetensors weights)",
    "ray": "the ray extra: only the Ray executor needs it",
    "matplotlib": "the plot extra: only --plot and the reports' figures need it",
    "converter.torch.load": "imports torch at its top (the torch extra)",
    "converter.torch.distill": "imports torch at its top (the torch extra)",
    "converter.torch.structured": "imports torch and torch-pruning at its top (the extras)",
    "onnxruntime.quantization": "imports torch when torch is installed (1-5 s, ~400 MB): "
    "loaded by the passes that quantize, through passes/ort.py",
}
# commands/ parse flags and call the API: the API (onnx, onnxruntime, numpy) is imported in
# each verb's run, so that `onnxship --help` loads none of it (0.09 s instead of 0.8 s).
LAZY_API_LAYER = "converter/commands"
BEGIN, END = "<!-- architecture: begin -->", "<!-- architecture: end -->"


def _layer(path: Path) -> str:
    rel = path.relative_to(ROOT).parent.as_posix()
    return rel if rel in LAYERS else next(layer for layer in LAYERS if rel.startswith(layer))


@cache
def modules() -> dict[str, Path]:
    found = {}
    for top in ("converter", "passes"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _target(name: str) -> str | None:
    """The project module an imported name lives in (None for other packages)."""
    while name and name not in modules():
        name = name.rpartition(".")[0]
    return name or None


@cache
def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported name, line, inside a function) for every import of ``module``."""
    tree = ast.parse(modules()[module].read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                for a in child.names:  # `from pkg import module` names a module
                    full = f"{child.module}.{a.name}"
                    name = full if _target(full) == full else child.module
                    found.append((name, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in modules()}
    for m in modules():
        for name, _, _ in imports(m):
            target = _target(name)
            if target and target != m and not m.startswith(f"{target}."):
                edges[m].add(target)  # a package's __init__ running first is no arrow
    return edges


def test_every_module_is_in_a_layer() -> None:
    assert modules(), "no modules found"
    for path in modules().values():
        assert _layer(path) in LAYERS


def test_no_import_points_up() -> None:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = []
    for m, path in modules().items():
        for name, line, _ in imports(m):
            target = _target(name)
            if target and rank[_layer(modules()[target])] > rank[_layer(path)]:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "imports pointing up a layer:\n" + "\n".join(upward)


def _cycle(edges: dict[str, set[str]]) -> list[str]:
    """One circle of ``edges`` (empty when there is none), by depth-first search."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := walk(n)):
                return found
        state[m] = 2
        stack.pop()
        return []

    for m in sorted(edges):
        if m not in state and (found := walk(m)):
            return found
    return []


def test_no_import_circles() -> None:
    circle = _cycle(_edges())
    assert not circle, "import circle: " + " -> ".join(circle)


def test_the_circle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_imports_inside_functions_only_keep_something_optional() -> None:
    wrong = []
    for m, path in modules().items():
        for name, line, in_function in imports(m):
            if not in_function or any(name == k or name.startswith(f"{k}.") for k in LAZY):
                continue
            if _target(name) and _layer(path) == LAZY_API_LAYER:
                continue
            wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name} inside a function")
    assert not wrong, "move these to the top of their module:\n" + "\n".join(wrong)


def _owns(layer: str) -> str:
    """The first sentence of the layer package's docstring."""
    doc = ast.get_docstring(ast.parse((ROOT / layer / "__init__.py").read_text())) or ""
    return re.split(r"(?<=\.)\s", " ".join(doc.split()), maxsplit=1)[0].replace("``", "`")


def architecture_table() -> str:
    rows = ["| folder | owns | may import |", "|---|---|---|"]
    for i in range(len(LAYERS) - 1, -1, -1):
        below = ", ".join(f"`{layer}/`" for layer in reversed(LAYERS[:i])) or "nothing of ours"
        rows.append(f"| `{LAYERS[i]}/` | {_owns(LAYERS[i])} | {below} |")
    return "\n".join(rows)


def test_readme_architecture_is_the_tree() -> None:
    readme = (ROOT / "README.md").read_text()
    assert BEGIN in readme and END in readme, "README.md lacks the architecture markers"
    shown = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert shown == architecture_table(), "README architecture is stale: python " + __file__


if __name__ == "__main__":  # rewrite the README's table from the tree
    readme = (ROOT / "README.md").read_text()
    head, rest = readme.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    (ROOT / "README.md").write_text(f"{head}{BEGIN}\n{architecture_table()}\n{END}{tail}")
    sys.exit(0)
