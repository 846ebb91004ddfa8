"""Dependencies point one way (issue 13, item 7).

Layers, lowest first; a module may import its own layer and the layers below it, never one above:

    common    distill.common.*                                                    (no project imports but each other)
    encoders  distill.encoders.*                                                  (the teacher wrappers)
    toy       distill.toy.*                                                       (the toy world: trains teachers with encoders)
    distill   every other distill module                                          (student, distillation, data, CLIs)
    mllm      mllm.* except the study
    study     mllm.study.*

The graph is read with `ast` from the source files and counts every import, also those inside functions, so a
cycle cannot hide behind a function-local import. A second check imports the packages in fresh interpreters and
looks at `sys.modules`. The one way a lower layer reaches a higher one is the name resolver's provider table
(`distill.common.names.PROVIDERS`, "module:function" strings imported on first use), which is checked here too.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "mllm")
LAYERS = ("common", "encoders", "toy", "distill", "mllm", "study")


def layer_of(module: str) -> str:
    for prefix, layer in (("distill.common", "common"), ("distill.encoders", "encoders"), ("distill.toy", "toy"), ("mllm.study", "study")):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return module.split(".")[0]


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: source file} of every module of the project packages."""
    modules = {}
    for package in PACKAGES:
        for file in sorted((root / package).rglob("*.py")):
            parts = list(file.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = file
    return modules


def imports_of(module: str, file: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function?) for every import statement in `file`."""
    tree = ast.parse(file.read_text(), str(file))
    is_package = file.name == "__init__.py"
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import
                    anchor = module.split(".")[: len(module.split(".")) - child.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    target = f"{base}.{alias.name}"
                    found.append((target if target in known else base, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    result = []
    for name, line, local in found:
        while name and name not in known:  # `import distill.encoders.clip.X` -> the deepest project module
            name = name.rpartition(".")[0]
        if name and name != module:
            result.append((name, line, local))
    return result


def import_graph(root: Path = ROOT) -> dict[str, list[tuple[str, int, bool]]]:
    modules = project_modules(root)
    return {module: imports_of(module, file, set(modules)) for module, file in modules.items()}


def layer_violations(graph: dict) -> list[str]:
    """'a (layer) -> b (layer) line N' for every import that points to a higher layer."""
    bad = []
    for module, edges in graph.items():
        for target, line, _ in edges:
            if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(module)):
                bad.append(f"{module} ({layer_of(module)}) -> {target} ({layer_of(target)}) at line {line}")
    return bad


def cycles(graph: dict) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. the import cycles."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target, _, _ in graph.get(node, []):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_graph_reader_sees_function_local_imports_and_cycles(tmp_path):
    """The checker itself: a cycle hidden behind a function-local import, and an upward import, are found."""
    (tmp_path / "distill" / "encoders").mkdir(parents=True)
    (tmp_path / "distill" / "toy").mkdir()
    (tmp_path / "mllm").mkdir()
    (tmp_path / "distill" / "encoders" / "paths.py").write_text("def f():\n    from distill.toy.cache import toy_path\n")
    (tmp_path / "distill" / "toy" / "cache.py").write_text("from distill.encoders import paths\n")
    (tmp_path / "distill" / "student.py").write_text("import mllm.towers\n")
    (tmp_path / "mllm" / "towers.py").write_text("from ..distill import io\n")
    (tmp_path / "distill" / "io.py").write_text("")
    graph = import_graph(tmp_path)
    assert graph["mllm.towers"] == [("distill.io", 1, False)]
    assert ("distill.toy.cache", 2, True) in graph["distill.encoders.paths"]
    assert cycles(graph) == [["distill.encoders.paths", "distill.toy.cache"]]
    assert layer_violations(graph) == [
        "distill.encoders.paths (encoders) -> distill.toy.cache (toy) at line 2",
        "distill.student (distill) -> mllm.towers (mllm) at line 1",
    ]


def test_imports_follow_the_layers():
    graph = import_graph()
    assert len(graph) > 50, "the project's modules were not found"
    assert layer_violations(graph) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


# Function-local imports of project modules allowed in the lower layers, each with its reason.
LOCAL_IMPORTS_ALLOWED = {("distill.toy.cache", "distill.toy.lm"): "transformers is heavy; only the LM stage needs it"}


def test_lower_layers_import_project_modules_at_the_top():
    """common / encoders / toy: no function-local import of a project module (nothing left to hide a cycle behind)."""
    local = [(module, target) for module, edges in import_graph().items() if layer_of(module) in ("common", "encoders", "toy")
             for target, _, inside in edges if inside]
    assert [pair for pair in local if pair not in LOCAL_IMPORTS_ALLOWED] == []


def test_distill_never_names_mllm():
    """Not even in a string (importlib, plugin table): distill is usable without mllm."""
    offenders = [str(file.relative_to(ROOT)) for name, file in project_modules().items()
                 if name.startswith("distill") and ("mllm." in file.read_text() or "import mllm" in file.read_text())]
    assert offenders == []


def test_provider_table_points_up_only_to_the_toy_world():
    from distill.common import names

    for scheme, provider in names.PROVIDERS.items():
        module = provider.split(":")[0]
        assert module in project_modules(), f"{scheme}: provider module {module} does not exist"
        assert layer_of(module) == "toy", f"{scheme}: the resolver may only call into the toy world, not {module}"


IMPORT_CHECK = """
import importlib, sys
modules, forbidden = sys.argv[1].split(","), sys.argv[2].split(",")
for name in modules:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
print(" ".join(loaded))
"""


@pytest.mark.parametrize("layer, forbidden", [
    ("common", ["distill.encoders", "distill.toy", "mllm"]),
    ("encoders", ["distill.toy", "mllm"]),
    ("distill", ["mllm"]),
])
def test_importing_a_layer_loads_nothing_above_it(layer, forbidden):
    """Each layer's modules imported together in a fresh interpreter: no module of a forbidden package appears."""
    upto = LAYERS.index(layer)
    modules = [m for m in project_modules() if LAYERS.index(layer_of(m)) <= upto and not m.endswith("__main__")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", IMPORT_CHECK, ",".join(modules), ",".join(forbidden)],
                            capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [], f"importing the {layer} layer loaded {result.stdout.split()}"
