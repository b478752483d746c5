"""What federated sampling would send over a network, computed from the sampler's counts.

Nothing is sent: the agents are stacked in one process. This is the traffic a deployment with
the server and the K agents on separate machines would need for the same samples, per generated
sample:

* each score evaluation is one round trip: the server sends the current point (x, t, y) to every
  agent it asks, each returns its score (and, for a density-weighted member on the
  probability-flow ODE, its ``probes`` Hutchinson divergence estimates); the aggregate, and any
  aggregator state (the tracked log-densities), stay on the server;
* the agents asked: those the sampler evaluated for each sample (``aggregators.agents_asked``:
  all K, but the m a sparse member dispatches, one for ``route``, k for ``label_prior`` with
  ``top_k`` = k; ``superdiff_or``'s ``top_k`` still asks all K, every agent's log-density being
  tracked from its own score), read from the set's record, so that the traffic counted is the
  computation done;
* against training's communication: one FedAvg round moves every agent's weights twice (the
  global model down, the update up).

Values are fp32 (4 bytes each); a label and a time cost one value each.
"""

from __future__ import annotations

import json
import math
import os

from fedinf_jax.data import digits
from fedinf_jax.evaluation import sample_sets

VALUE_BYTES = 4


def sample_traffic(
    agents_asked: int,
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
    to_agents = agents_asked * evaluations * (image_size + 2) * VALUE_BYTES
    scores = 2 if guided else 1
    to_server = agents_asked * evaluations * (scores * image_size + probes) * VALUE_BYTES
    return {
        "agents_asked": agents_asked,
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
    # The divergence estimates a member asks for on the probability-flow ODE (its ``probes``).
    probes = settings.get("probes", 0) if config["sampler"]["method"] == "ode" else 0
    guided = config["sampler"].get("guidance", 1.0) != 1
    # The agents evaluated per sample: the network evaluations recorded over the score
    # evaluations (two per agent guided); a set recorded before they were counted asked all K.
    network = stats.get("network_evaluations")
    per_score = (2 if guided else 1) * stats["score_evaluations"]
    asked = round(network / per_score) if network else k
    evaluations = sample_sets.evaluations_per_sample(stats)
    traffic = sample_traffic(asked, evaluations, math.prod(digits.IMAGE_SHAPE), probes, guided)
    fedavg = fedavg_round_bytes(k, params_per_agent)
    return dict(
        traffic, fedavg_round_bytes=fedavg, samples_per_fedavg_round=fedavg / traffic["bytes"]
    )
