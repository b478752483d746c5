"""Control regime: one agent trained on the whole training set (the centralized baseline)."""

from configs import base


def get_config(preset: str | None = None):
    return base.for_regime(preset, "control", num_agents=1)
