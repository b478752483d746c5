"""Base configuration: every section a run reads, plus the size presets.

Use a regime file (``configs/hetero.py``, ``configs/homo.py``, ``configs/control.py``) with a preset
argument: ``--config=configs/hetero.py:cpu``. Presets:

* ``smoke``: seconds; tiny U-Net, at most 2 agents, a few steps (tests and CI).
* ``demo``: minutes on a 2-core CPU; a small U-Net, all agents of the regime.
* ``cpu``: the reproduction on a CPU: 400 steps of batch 32 for 10 agents, about 70 minutes on
  2 cores (raise ``train.num_steps`` for better agents).
* ``paper``: the paper's UNet2DConditionModel (about 170M parameters) and training recipe (AdamW
  lr 1e-4, 500 warm-up steps, cosine decay, batch 16, 10 epochs, VE sigma = 25), for a GPU/TPU,
  with the score scaling done correctly.
"""

import ml_collections

PRESETS = ("smoke", "demo", "cpu", "paper")
DEFAULT_PRESET = "cpu"


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """The heterogeneous-regime config at the given preset (default ``cpu``)."""
    preset = preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {list(PRESETS)}")
    config = ml_collections.ConfigDict()
    config.preset = preset
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    # A directory with the four MNIST IDX .gz files; empty: $FEDINF_MNIST_DIR, else TFDS.
    config.data.mnist_dir = ""
    config.data.centered = True  # pixels in [-1, 1]

    config.partition = ml_collections.ConfigDict()
    config.partition.name = "heterogeneous"
    config.partition.num_agents = 10
    config.partition.seed = 0
    config.partition.owner_fraction = 0.5  # heterogeneous
    config.partition.alpha = 0.5  # dirichlet
    config.partition.min_partition_size = 10  # dirichlet
    config.partition.classes_per_agent = 2  # pathological

    config.model = ml_collections.ConfigDict()
    config.model.block_out_channels = (16, 32, 64)
    config.model.layers_per_block = 1
    config.model.attention_levels = (False, False, True)
    config.model.up_attention_levels = (False, False, True)
    config.model.mid_attention = True
    config.model.norm_groups = 8
    config.model.num_heads = 4
    config.model.num_classes = 10
    config.model.class_embedding = True
    config.model.dtype = "float32"

    config.sde = ml_collections.ConfigDict()
    config.sde.name = "vp"
    config.sde.beta_min = 0.1
    config.sde.beta_max = 20.0
    config.sde.sigma_min = 0.01
    config.sde.sigma_max = 50.0
    config.sde.sigma = 25.0  # ve_paper
    config.sde.eps = 1e-5  # training t ~ U(eps, T)

    config.train = ml_collections.ConfigDict()
    # cpu preset: about 10 s per step for 10 agents on 2 cores (README), so about an hour.
    config.train.num_steps = 400
    config.train.batch_size = 32  # per agent
    config.train.learning_rate = 2e-3
    config.train.warmup_steps = 40
    config.train.end_lr_factor = 0.01
    config.train.weight_decay = 1e-4
    config.train.grad_clip = 1.0
    config.train.ema_decay = 0.999
    config.train.log_every = 10
    config.train.checkpoint_every = 50
    config.train.keep_checkpoints = 3

    # How the stacked agent axis is executed ("auto": per backend, see fedinf_jax/agents.py).
    config.agent_axis = ml_collections.ConfigDict()
    config.agent_axis.train = "auto"
    config.agent_axis.score = "auto"

    _apply_preset(config, preset)
    return config


def _apply_preset(config: ml_collections.ConfigDict, preset: str) -> None:
    if preset == "smoke":
        config.partition.num_agents = 2
        config.model.block_out_channels = (8, 16)
        config.model.attention_levels = (False, True)
        config.model.up_attention_levels = (False, True)
        config.model.mid_attention = False
        config.model.norm_groups = 4
        config.model.num_heads = 2
        config.train.num_steps = 30
        config.train.batch_size = 8
        config.train.warmup_steps = 5
        config.train.log_every = 10
        config.train.checkpoint_every = 10
    elif preset == "demo":
        config.model.block_out_channels = (8, 16, 32)
        config.model.norm_groups = 4
        config.model.num_heads = 2
        config.train.num_steps = 200
        config.train.batch_size = 32
        config.train.warmup_steps = 20
        config.train.log_every = 25
        config.train.checkpoint_every = 100
    elif preset == "paper":
        config.model.block_out_channels = (32, 480, 576, 576)
        config.model.layers_per_block = 2
        config.model.attention_levels = (False, False, True, False)
        # diffusers lists up blocks deepest first: (Up, Up, CrossAttnUp, Up) puts cross-attention
        # at the 480-channel level on the way up.
        config.model.up_attention_levels = (False, True, False, False)
        config.model.norm_groups = 32
        config.model.num_heads = 8
        config.model.class_embedding = False
        config.sde.name = "ve_paper"
        config.train.batch_size = 16
        config.train.learning_rate = 1e-4
        config.train.warmup_steps = 500
        config.train.weight_decay = 1e-2
        config.train.end_lr_factor = 0.0
        # 10 epochs of a heterogeneous shard of about 6000 images at batch 16.
        config.train.num_steps = 3750
        config.train.ema_decay = 0.9999
        config.train.log_every = 100
        config.train.checkpoint_every = 500


def for_regime(preset: str | None, partition: str, num_agents: int) -> ml_collections.ConfigDict:
    """A regime file's config: the base at ``preset`` with its partition and number of agents.

    The ``smoke`` preset caps the number of agents at 2 so that tests compile small programs.
    """
    config = get_config(preset)
    config.partition.name = partition
    smoke = config.preset == "smoke"
    config.partition.num_agents = min(num_agents, 2) if smoke else num_agents
    return config
