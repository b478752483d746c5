"""Federated inference for score-based diffusion models: K agents trained on separate shards,
their scores combined at sampling time.

The package is read bottom up, one subpackage per layer, each importing only its own layer and
those below it (docs/design.md, "Layers"; tests/test_architecture.py checks it): ``core``,
``data``, ``models``, ``diffusion``, ``agents``, ``sampling``, ``evaluation``, ``workflows``.

The Python API (docs/api.md) is ``fedinf_jax.load``, a trained federation from its run folder,
and what it returns (``fedinf_jax.workflows.federation``); it is imported on first use, so that
``import fedinf_jax`` costs nothing.
"""

_API = ("load", "Federation", "SampleSet")


def __getattr__(name: str):
    if name in _API:
        from fedinf_jax.workflows import federation

        return getattr(federation, name)
    raise AttributeError(f"module 'fedinf_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
