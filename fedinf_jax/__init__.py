"""Federated inference for score-based diffusion models: K agents trained on separate shards,
their scores combined at sampling time.

The package is read bottom up, one subpackage per layer, each importing only its own layer and
those below it (docs/design.md, "Layers"; tests/test_architecture.py checks it): ``core``,
``data``, ``models``, ``diffusion``, ``agents``, ``sampling``, ``evaluation``, ``workflows``.
"""
