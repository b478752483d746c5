"""Shared array type aliases (jaxtyping) for public signatures.

The stacked-agent axis is always the leading axis and is called ``agents``.
"""

from typing import Any, TypeAlias

import jax
from jaxtyping import Array, Float, Int, PRNGKeyArray

PyTree: TypeAlias = Any
Params: TypeAlias = PyTree
"""One agent's parameters (a Flax variable dict)."""
AgentParams: TypeAlias = PyTree
"""Parameters of K agents, every leaf stacked on a leading ``agents`` axis."""

Key: TypeAlias = PRNGKeyArray | jax.Array
Images: TypeAlias = Float[Array, "batch height width channels"]
AgentImages: TypeAlias = Float[Array, "agents batch height width channels"]
Labels: TypeAlias = Int[Array, " batch"]
AgentLabels: TypeAlias = Int[Array, "agents batch"]
Times: TypeAlias = Float[Array, " batch"]

__all__ = [
    "AgentImages",
    "AgentLabels",
    "AgentParams",
    "Array",
    "Float",
    "Images",
    "Int",
    "Key",
    "Labels",
    "Params",
    "PyTree",
    "Times",
]
