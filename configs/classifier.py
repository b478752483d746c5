"""The evaluation classifier (fedinf_jax/evaluation/classifier.py): its own model and recipe.

Presets: ``cpu`` (default; about 3 epochs, meant to pass 99.3% test accuracy), ``demo`` (a
smaller network for a minute, for ``make demo``; floor 95%) and ``smoke`` (a few steps for tests,
with no accuracy floor).
"""

import ml_collections

PRESETS = ("smoke", "demo", "cpu")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    preset = preset or "cpu"
    if preset not in PRESETS:
        raise ValueError(f"unknown classifier preset {preset!r}; valid: {list(PRESETS)}")
    config = ml_collections.ConfigDict()
    config.preset = preset
    config.seed = 0
    config.min_test_accuracy = 0.993  # refuse a weaker feature extractor

    config.data = ml_collections.ConfigDict()
    config.data.mnist_dir = ""  # empty: $FEDINF_MNIST_DIR, else TFDS
    config.data.tfds_data_dir = ""  # TFDS's data_dir; empty: $TFDS_DATA_DIR or its default
    config.data.centered = True

    config.model = ml_collections.ConfigDict()
    config.model.channels = (32, 64, 128)
    config.model.num_classes = 10
    config.model.groups = 8

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 128
    config.train.num_steps = 1400  # about 3 epochs
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 100
    config.train.end_lr_factor = 0.01
    config.train.weight_decay = 1e-4
    config.train.grad_clip = 1.0
    config.train.max_shift = 2  # random translation augmentation, pixels
    config.train.log_every = 100

    if preset == "demo":
        config.min_test_accuracy = 0.95
        config.model.channels = (16, 32, 64)
        config.train.batch_size = 64
        config.train.num_steps = 500
        config.train.warmup_steps = 30
        config.train.log_every = 50
    elif preset == "smoke":
        config.min_test_accuracy = 0.0
        config.model.channels = (8, 16)
        config.model.groups = 4
        config.train.num_steps = 20
        config.train.warmup_steps = 2
        config.train.log_every = 10
    return config
