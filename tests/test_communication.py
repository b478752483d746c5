"""The traffic a deployment of the federation would need, from the sampler's counts."""

import json

import pytest

from fedinf_jax.evaluation import communication as C


def test_bytes_per_sample_and_a_fedavg_round():
    """K = 2 agents, 3 evaluations of a 4-value image: each evaluation sends x (4), t and y to
    both agents, 6 values each, and receives a 4-value score (and one divergence estimate per
    probe) from each."""
    t = C.sample_traffic(2, 3, 4)
    assert t == {
        "agents_asked": 2,
        "round_trips": 3,
        "bytes_to_agents": 2 * 3 * 6 * 4,
        "bytes_to_server": 2 * 3 * 4 * 4,
        "bytes": 2 * 3 * 10 * 4,
    }
    probed = C.sample_traffic(2, 3, 4, probes=2)
    assert probed["bytes_to_server"] == 2 * 3 * 6 * 4
    guided = C.sample_traffic(2, 3, 4, guided=True)  # two scores back, x sent once
    assert guided["bytes_to_agents"] == t["bytes_to_agents"]
    assert guided["bytes_to_server"] == 2 * t["bytes_to_server"]
    routed = C.sample_traffic(1, 3, 4)
    assert routed["bytes"] == t["bytes"] / 2 and routed["round_trips"] == 3
    assert C.fedavg_round_bytes(10, 1000) == 2 * 10 * 1000 * 4


@pytest.mark.parametrize("method, probes", [("sde", 0), ("ode", 1)])
def test_a_sample_sets_traffic(tmp_path, method, probes):
    """From a set's samples.json: the evaluations per batch, the member's own section, the ODE's
    probes, and the agents asked per sample as the sampler counted its network evaluations
    (all K for a set recorded before they were)."""
    record = {
        "config": {
            "aggregator": {"name": "superdiff_or", "superdiff_or": {"probes": 1, "top_k": 0}},
            "sampler": {"method": method},
        },
        "stats": {"num_agents": 10, "score_evaluations": 202, "batches": 2},
    }
    (tmp_path / "samples.json").write_text(json.dumps(record))
    t = C.of_sample_dir(str(tmp_path), params_per_agent=1000)
    assert t["agents_asked"] == 10 and t["round_trips"] == 101
    assert t["bytes"] == 10 * 101 * ((784 + 2) + (784 + probes)) * 4
    assert t["samples_per_fedavg_round"] == pytest.approx(2 * 10 * 1000 * 4 / t["bytes"])
    record["config"]["aggregator"] = {"name": "route", "route": {"prior": "label"}}
    record["config"]["sampler"]["guidance"] = 2.0
    record["stats"]["network_evaluations"] = 202 * 2  # one agent per sample, guided
    (tmp_path / "samples.json").write_text(json.dumps(record))
    t = C.of_sample_dir(str(tmp_path), params_per_agent=1000)
    assert t["agents_asked"] == 1 and t["bytes"] == 101 * ((784 + 2) + 2 * 784) * 4
