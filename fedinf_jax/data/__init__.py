"""MNIST (``digits``), the regimes' shards (``partitions``) and each agent's batches
(``input_pipeline``). ``python -m fedinf_jax.data`` prepares TFDS's ``mnist`` from IDX files."""
