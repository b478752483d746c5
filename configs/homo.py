"""Homogeneous regime: 10 agents, each with 10% of every digit (IID)."""

from configs import base


def get_config(preset: str | None = None):
    return base.for_regime(preset, "homogeneous", num_agents=10)
