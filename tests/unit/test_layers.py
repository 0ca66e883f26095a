"""The import direction of docs/architecture.md: core <- models, data, metrics <- methods <- train <- harness.

Every import in every module is checked, function-level ones included: a lazy import is still a dependency.
Run alone: pytest tests/unit/test_layers.py
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Source folders and the import names they install under (pyproject.toml's package-dir).
SOURCES = {"stepdistill": ROOT / "stepdistill", "stepdistill.eval": ROOT / "eval", "stepdistill.bench": ROOT / "bench",
           "stepdistill.pipelines": ROOT / "pipelines"}

# Layer of a module: the longest prefix listed here. A module may import its own layer and the layers below, never
# a layer above, with no exception (docs/architecture.md).
LAYERS = {
    "stepdistill.core": 0, "stepdistill.errors": 0, "stepdistill.resources": 0,
    # Models, data (the toy world included), metrics (the toy judge and reward models included), and the export
    # folder's files: LoRA formats and the model card beside them.
    "stepdistill.models": 1, "stepdistill.data": 1, "stepdistill.metrics": 1, "stepdistill.export": 1,
    "stepdistill.card": 1,
    "stepdistill.methods": 2, "stepdistill.registry": 2, "stepdistill.config": 2,
    "stepdistill.train": 3,  # the loop, the builder, checkpoints, the toy teacher's trainer
    # The harness and front doors: evaluation, benchmarks, inference pipelines, generation, the Hub, the demo, the CLI.
    "stepdistill.eval": 4, "stepdistill.bench": 4, "stepdistill.pipelines": 4, "stepdistill.generate": 4,
    "stepdistill.push": 4, "stepdistill.demo": 4, "stepdistill.cli": 4, "stepdistill": 4,
}
LAYER_NAMES = ["core", "models/data/metrics", "methods", "train", "harness"]


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise KeyError(f"{module} has no layer: add it to LAYERS in tests/unit/test_layers.py and docs/architecture.md")


def modules():
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("").parts
            if any(p in SOURCES and p != "stepdistill" for p in rel):
                continue
            name = ".".join((package, *rel)).removesuffix(".__init__")
            if name.startswith(("stepdistill.eval.", "stepdistill.bench.", "stepdistill.pipelines.")):
                pass
            elif package == "stepdistill" and rel and rel[0] in ("eval", "bench", "pipelines"):
                continue
            yield name, path


def imports_of(name: str, path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:  # `from stepdistill import pipelines` imports the harness
                yield f"{target}.{alias.name}", node.lineno


def violations():
    out = []
    for name, path in modules():
        own = layer(name)
        for target, line in imports_of(name, path):
            if not (target == "stepdistill" or target.startswith("stepdistill.")):
                continue
            try:
                theirs = layer(target)
            except KeyError:
                continue  # `from stepdistill.x import name`: the name is not a module
            if target == "stepdistill":
                continue
            if theirs > own:
                out.append(f"{path.relative_to(ROOT)}:{line} ({LAYER_NAMES[own]}) imports {target} "
                           f"({LAYER_NAMES[theirs]})")
    return out


def test_every_module_has_a_layer():
    for name, _ in modules():
        layer(name)


def test_library_never_imports_upwards():
    found = violations()
    assert not found, "imports against the layer direction:\n" + "\n".join(found)


def test_harness_never_imports_train_internals():
    """eval/ and pipelines/ consume exported artifacts (the acceptance contract): no stepdistill.train, except
    the training and data benchmarks, which are harnesses over the loop by design."""
    found = []
    loop_harnesses = ("stepdistill.bench.train", "stepdistill.bench.data")
    for name, path in modules():
        if name.startswith(("stepdistill.pipelines", "stepdistill.eval")) and name not in loop_harnesses:
            found += [f"{path.relative_to(ROOT)}:{line} imports {t}" for t, line in imports_of(name, path)
                      if t.startswith("stepdistill.train")]
    assert not found, "\n".join(found)


def test_the_checker_sees_a_violation(tmp_path):
    """The checker itself must be able to fail: a core module importing the harness is reported."""
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from stepdistill.eval import toy\n")
    targets = [t for t, _ in imports_of("stepdistill.core.fake", fake)]
    assert any(layer(t) > layer("stepdistill.core.fake") for t in targets if t.startswith("stepdistill.eval"))


@pytest.mark.parametrize("name", ["eval", "bench", "pipelines"])
def test_no_generic_top_level_import_names(name):
    """Nothing installs as a top-level `eval` or `pipelines` (a wheel exposes only `stepdistill`)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "stepdistill" or p.startswith("stepdistill.") for p in config["packages"])
    assert config["package-dir"][f"stepdistill.{name}"] == name


def test_tests_import_the_installed_names():
    """`import eval...` would load the repository folder a second time under another name (and shadow the
    builtin `eval`): tests import stepdistill.eval and stepdistill.pipelines like users do."""
    found = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for target, line in imports_of("tests.x", path):
            if target.split(".")[0] in ("eval", "bench", "pipelines"):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not found, "\n".join(found)


def module_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports. A module's own parent packages are left out: Python has run them
    before the module itself, so `from . import sibling` adds no edge to the package."""
    names = dict(modules())
    graph = {}
    for name, path in names.items():
        graph[name] = {t for t, _ in imports_of(name, path)
                       if t in names and t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    """A cycle is two layers in one: the module that closes it has a name in the wrong place."""
    found = cycles(module_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_a_method_never_loads_a_model():
    """Methods are losses only (DESIGN.md sec. 2): loading a network is train/build.py's, through the loaders a method
    names in Distiller.models_to_load; a call of a model loader inside methods/ is reported."""
    loaders = {"from_pretrained", "load_reward_model", "load_judge", "create_model", "load_pipeline", "load_family"}
    found = []
    for name, path in modules():
        if not name.startswith("stepdistill.methods"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in loaders:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} calls {called}")
    assert not found, "\n".join(found)
