"""One process of the two-process federation (tests/test_sharding.py starts two of these).

    python -m tests.multiprocess_worker PROCESS_ID PORT OUTDIR

Two processes on localhost (coordinator 127.0.0.1:PORT, XLA:CPU's gloo collectives), two
virtual CPU devices each: the K = 4 agents of ``case()`` are split over the 4 devices, so each
process holds two. Both save the agents' train state as one Orbax checkpoint (each process
writes its own agents' shards) and sample the federation; process 0 writes the samples. Each
process writes which agents its devices hold. Then two sharded training steps; process 0 writes
the losses and one trained kernel.
"""

import json
import os
import sys

NUM_PROCESSES, DEVICES_PER_PROCESS, NUM_AGENTS = 2, 2, 4


def case():
    """The federation both this worker and the single-process reference build: (config,
    components, params, counts, labels)."""
    import numpy as np

    from fedinf_jax.agents import runs
    from tests.conftest import micro_config

    config = micro_config()
    config.sampler.update(num_steps=4, batch_size=4, num_per_class=1)
    config.aggregator.name = "label_prior"
    comp = runs.resolve(config)
    params = runs.init_agents(comp.model, NUM_AGENTS, runs.make_key(2))
    counts = np.arange(1, 10 * NUM_AGENTS + 1).reshape(NUM_AGENTS, 10)
    labels = np.arange(10, dtype=np.int32)
    return config, comp, params, counts, labels


def main(process_id: int, port: int, outdir: str) -> None:
    from tests.conftest import suite_xla_flags

    os.environ["XLA_FLAGS"] = suite_xla_flags(
        f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    )
    from fedinf_jax.core import runtime

    runtime.initialize_distributed(f"127.0.0.1:{port}", NUM_PROCESSES, process_id)
    import jax
    import numpy as np

    from fedinf_jax.agents import checkpoint, sharding
    from fedinf_jax.data.input_pipeline import synthetic_batch
    from fedinf_jax.workflows import sample_lib, train_lib
    from tests.conftest import micro_train_step

    config, comp, params, counts, labels = case()
    agent_mesh = sharding.make_mesh(config.mesh, NUM_AGENTS)
    state = sharding.to_mesh(train_lib.create_train_state(params, comp.tx), agent_mesh)
    manager = checkpoint.make_manager(os.path.join(outdir, "run"))
    checkpoint.save(manager, 1, state, {"num_agents": NUM_AGENTS})
    manager.close()

    kernel = state.params["params"]["conv_in"]["kernel"]
    held = sorted(
        i for shard in kernel.addressable_shards for i in range(NUM_AGENTS)[shard.index[0]]
    )
    with open(os.path.join(outdir, f"agents_{process_id}.json"), "w") as f:
        json.dump({"agents": held, "devices": jax.device_count()}, f)

    # Two training steps of the sharded agents: every process feeds the same host batch, each
    # transfers its own agents' part.
    step = micro_train_step("loop", agent_mesh)
    batch = sharding.to_mesh(synthetic_batch(NUM_AGENTS, 4), agent_mesh)
    trained, metrics = step(step(state, batch, jax.random.key(3))[0], batch, jax.random.key(3))
    trained_kernel = sharding.to_host(trained.params["params"]["conv_in"]["kernel"])
    if process_id == 0:
        np.savez(
            os.path.join(outdir, "trained.npz"),
            loss=np.asarray(metrics["loss"]),
            kernel=trained_kernel,
        )

    federation = sample_lib.Restored(config, state.params, counts, 1, comp, agent_mesh)
    drawn = sample_lib.sample_in_batches(
        sample_lib.build_sampler(federation),
        federation.params,
        labels,
        config.sampler.batch_size,
        config.sampler.seed,
        agent_mesh,
    )
    if process_id == 0:
        np.save(os.path.join(outdir, "images.npy"), drawn.images)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
