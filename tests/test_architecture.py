"""The package's layers (docs/design.md, "Layers"): a module imports only from its own layer and
the layers below it, so nothing below the workflows imports a workflow; and every import of the
package is at a module's top, where the graph can be read."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "fedinf_jax"

# The layers, lowest first: each is a subpackage of fedinf_jax, and every module sits in one.
LAYERS = ("core", "data", "models", "diffusion", "agents", "sampling", "evaluation", "workflows")
LEVEL = {layer: level for level, layer in enumerate(LAYERS)}


def _layer(module: str) -> str:
    """A module's layer: the subpackage it sits in ("sampling.solvers" -> "sampling")."""
    return module.split(".")[0]


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name below it ("models.unet"; a package by its
    own name); the top-level ``__init__`` is left out (a docstring, no imports)."""
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


def test_every_module_sits_in_a_layer():
    unplaced = sorted(m for m in _modules() if _layer(m) not in LEVEL)
    assert not unplaced, (
        f"move these modules into a layer's subpackage {list(LAYERS)} (or add the layer to "
        f"tests/test_architecture.py and docs/design.md): {unplaced}"
    )


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_go_down_the_layers_and_sit_at_the_top(module):
    known = _modules()
    tree = ast.parse(known[module].read_text())
    for imported, line, at_top in _imports(tree, known):
        where = f"{known[module].relative_to(ROOT)}:{line} imports {imported}"
        assert at_top, f"{where} inside a function: import the package's modules at the top"
        assert LEVEL[_layer(imported)] <= LEVEL[_layer(module)], (
            f"{where}: {_layer(module)} may not import {_layer(imported)} "
            f"(layers, lowest first: {list(LAYERS)})"
        )


def test_the_rule_can_fail():
    """The check reads what it should: a workflow imported from the sampling layer, and an
    import inside a function, are both found."""
    known = _modules()
    tree = ast.parse(
        "from fedinf_jax.workflows import pipeline\n"
        "from fedinf_jax import models\n"
        "def f():\n    import fedinf_jax.diffusion.sde\n"
    )
    assert _imports(tree, known) == [
        ("workflows.pipeline", 1, True),
        ("models", 2, True),
        ("diffusion.sde", 4, False),
    ]
    assert LEVEL[_layer("workflows.pipeline")] > LEVEL[_layer("sampling.solvers")]


def test_the_package_root_imports_nothing():
    """``import fedinf_jax`` loads no layer: the root imports only inside the function that
    hands out the API on first use (``fedinf_jax.load``)."""
    tree = ast.parse((ROOT / PACKAGE / "__init__.py").read_text())
    assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    import subprocess
    import sys

    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, fedinf_jax; print(len([m for m in sys.modules "
            "if m.startswith('fedinf_jax.')]), 'jax' in sys.modules)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert loaded == ["0", "False"]
