"""Heterogeneous regime (the paper's): 10 agents, 50% one digit, 50% the other nine equally."""

from configs import base


def get_config(preset: str | None = None):
    return base.for_regime(preset, "heterogeneous", num_agents=10)
