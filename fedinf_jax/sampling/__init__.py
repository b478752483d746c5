"""The server: the aggregators of the agents' scores, the federated score, the reverse-time
Diffrax terms, the solvers, and the jitted solve (``federated_sampler``)."""
