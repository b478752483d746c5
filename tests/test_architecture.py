"""The package's layers (docs/design.md, "Layers"): a module imports only from its own layer and
the layers below it, so nothing below the workflows imports a workflow; and every import of the
package is at a module's top, where the graph can be read."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "fedinf_jax"

# Lowest first. A new module must be placed here (the test names any that is not).
LAYERS = {
    "core": ("registry", "errors", "files", "types", "runtime", "provenance"),
    "data": ("data", "partitions", "input_pipeline"),
    "models": ("models", "models.layers", "models.unet", "optim"),
    "diffusion": ("sde", "score", "density"),
    "agents": ("agents", "sharding", "checkpoint", "pretrained", "dispatch", "runs"),
    "sampling": ("aggregators", "federated_score", "reverse", "solvers", "sampling"),
    "evaluation": (
        "evaluation",
        "evaluation.metrics",
        "evaluation.agreement",
        "evaluation.communication",
        "evaluation.classifier",
        "evaluation.sample_sets",
        "evaluation.report",
    ),
    "workflows": (
        "plots",
        "train_lib",
        "sample_lib",
        "study",
        "study_lib",
        "pipeline",
        "pretrain_lib",
    ),
}
LEVEL = {module: level for level, modules in enumerate(LAYERS.values()) for module in modules}
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name below it ("models.unet"; a package by its
    own name); the top-level ``__init__`` is left out (it is empty)."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT / PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def _imports(tree: ast.Module, known) -> list[tuple[str, int, bool]]:
    """(module imported, line, at the module's top) for each import of the package."""
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module.split(".")[0] == PACKAGE:
                base = node.module[len(PACKAGE) + 1 :]
                names = [f"{base}.{a.name}".lstrip(".") for a in node.names]
                names = [n if n in known else base for n in names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
            names = [n[len(PACKAGE) + 1 :] for n in names]
        else:
            continue
        for name in names:
            if name in known:
                out.append((name, node.lineno, id(node) in top))
    return out


def test_every_module_has_a_layer():
    unplaced = sorted(set(_modules()) - set(LEVEL))
    assert not unplaced, f"place these modules in a layer (tests/test_architecture.py): {unplaced}"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_go_down_the_layers_and_sit_at_the_top(module):
    known = _modules()
    tree = ast.parse(known[module].read_text())
    for imported, line, at_top in _imports(tree, known):
        where = f"{known[module].relative_to(ROOT)}:{line} imports {imported}"
        assert at_top, f"{where} inside a function: import the package's modules at the top"
        assert LEVEL[imported] <= LEVEL[module], (
            f"{where}: {LAYER_OF[module]} may not import {LAYER_OF[imported]} "
            f"(layers, lowest first: {list(LAYERS)})"
        )


def test_the_rule_can_fail():
    """The check reads what it should: a workflow imported from the sampling layer, and an
    import inside a function, are both found."""
    known = _modules()
    tree = ast.parse("from fedinf_jax import pipeline\ndef f():\n    import fedinf_jax.sde\n")
    assert _imports(tree, known) == [("pipeline", 1, True), ("sde", 3, False)]
    assert LEVEL["pipeline"] > LEVEL["solvers"]
