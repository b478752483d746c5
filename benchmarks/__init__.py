"""Benchmarks and experiments, run from the repository's root as modules
(``python -m benchmarks.speed.sparse_dispatch``); benchmarks/README.md lists them."""
