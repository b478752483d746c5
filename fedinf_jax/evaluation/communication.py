"""What federated sampling would send over a network, computed from the sampler's counts.

Nothing is sent: the agents are stacked in one process. This is the traffic a deployment with
the server and the K agents on separate machines would need for the same samples, per generated
sample:

* each score evaluation is one round trip: the server sends the current point (x, t, y) to every
  agent it asks, each returns its score (and, for a density-weighted member on the
  probability-flow ODE, its ``probes`` Hutchinson divergence estimates); the aggregate, and any
  aggregator state (the tracked log-densities), stay on the server;
* the agents asked: all K for every member, but one for ``route`` (each sample's own agent) and
  k for ``label_prior`` with ``top_k`` = k (the others have weight 0 for that class).
  ``superdiff_or``'s ``top_k`` still asks all K: every agent's log-density is tracked from its
  own score;
* against training's communication: one FedAvg round moves every agent's weights twice (the
  global model down, the update up).

Values are fp32 (4 bytes each); a label and a time cost one value each.
"""

from __future__ import annotations

import json
import math
import os

from fedinf_jax import data

VALUE_BYTES = 4


def agents_asked(name: str, settings: dict, num_agents: int) -> int:
    """How many agents the server must ask per evaluation for member ``name`` with ``settings``
    (its config section)."""
    if name == "route":
        return 1
    top_k = int(settings.get("top_k", 0) or 0)
    if name == "label_prior" and 0 < top_k < num_agents:
        return top_k
    return num_agents


def sample_traffic(
    name: str,
    settings: dict,
    num_agents: int,
    evaluations: float,
    image_size: int,
    probes: int = 0,
    guided: bool = False,
) -> dict:
    """Per generated sample: ``agents_asked``, ``round_trips`` (= ``evaluations``, the score
    evaluations of its solve), ``bytes_to_agents`` (x, t, y per agent asked per evaluation),
    ``bytes_to_server`` (a score of ``image_size`` values, plus ``probes`` divergence estimates,
    per agent asked per evaluation; ``guided``: two scores, the label's and the guide's, each
    agent computing both from the same x) and ``bytes``, their sum."""
    asked = agents_asked(name, settings, num_agents)
    to_agents = asked * evaluations * (image_size + 2) * VALUE_BYTES
    scores = 2 if guided else 1
    to_server = asked * evaluations * (scores * image_size + probes) * VALUE_BYTES
    return {
        "agents_asked": asked,
        "round_trips": evaluations,
        "bytes_to_agents": to_agents,
        "bytes_to_server": to_server,
        "bytes": to_agents + to_server,
    }


def fedavg_round_bytes(num_agents: int, params_per_agent: int) -> int:
    """One FedAvg round for the same U-Net: each of K clients downloads the global weights and
    uploads its own, ``params_per_agent`` fp32 values each way."""
    return 2 * num_agents * params_per_agent * VALUE_BYTES


def of_sample_dir(sample_dir: str, params_per_agent: int) -> dict:
    """``sample_traffic`` of a ``sample.py`` set (its ``samples.json``: the aggregator section,
    the method, the image shape, the statistics), with ``fedavg_round_bytes`` and
    ``samples_per_fedavg_round`` (how many samples move as many bytes as one round)."""
    with open(os.path.join(sample_dir, "samples.json")) as f:
        record = json.load(f)
    config, stats = record["config"], record["stats"]
    agg = config["aggregator"]
    settings = agg.get(agg["name"])
    if not isinstance(settings, dict):  # sets written when the section was flat
        settings = agg
    k = stats["num_agents"]
    probes = 0
    if config["sampler"]["method"] == "ode" and agg["name"].startswith("superdiff"):
        probes = settings.get("probes", 0)
    size = math.prod(data.IMAGE_SHAPE)
    guided = config["sampler"].get("guidance", 1.0) != 1
    evaluations = stats["score_evaluations"] / stats["batches"]
    traffic = sample_traffic(agg["name"], settings, k, evaluations, size, probes, guided)
    fedavg = fedavg_round_bytes(k, params_per_agent)
    return dict(
        traffic, fedavg_round_bytes=fedavg, samples_per_fedavg_round=fedavg / traffic["bytes"]
    )
