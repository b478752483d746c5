"""Base configuration: every section a run reads, plus the size presets.

Use a regime file (``configs/hetero.py``, ``configs/homo.py``, ``configs/control.py``) with a preset
argument: ``--config=configs/hetero.py:cpu``. Presets:

* ``smoke``: seconds; tiny U-Net, at most 2 agents, a few steps (tests and CI).
* ``demo``: ``make demo``'s reproduction pipeline in minutes on a 2-core CPU: a two-level U-Net
  without attention, 150 steps of batch 16 per agent, all agents of the regime. Its samples are
  blobs, not digits: it shows the pipeline, not the result.
* ``cpu``: the reproduction on a CPU (``make reproduce``): a three-level U-Net (attention at 7x7),
  2400 steps of batch 32 per agent (about 13 epochs of a 6,000-image shard, 1.3 epochs of the
  control's 60,000), the budget chosen on the quality-per-minute curves (docs/quality.md, with
  its cost on a 2-core CPU); 25 ancestral steps (DPM-Solver++'s first-order SDE step) on the
  Karras grid when sampling, guided at w = 2.
* ``paper``: the paper's UNet2DConditionModel (about 170M parameters) and training recipe (AdamW
  lr 1e-4, 500 warm-up steps, cosine decay, batch 16, 10 epochs, VE sigma = 25), for a GPU/TPU,
  with the score scaling done correctly.

Modifiers follow the preset after commas, e.g. ``--config=configs/hetero.py:cpu,paper_sampler``:

* ``paper_sampler``: the paper's sampling procedure, for the ablation (docs/results.md):
  probability-flow ODE with adaptive dopri5, uniform ``mean`` aggregation, stop at t = 0.05 and
  no final denoising step.
"""

import dataclasses

import ml_collections

from fedinf_jax.sampling import aggregators, solvers

PRESETS = ("smoke", "demo", "cpu", "paper")
MODIFIERS = ("paper_sampler",)
DEFAULT_PRESET = "cpu"


def parse_preset(
    preset: str | None, modifiers: tuple[str, ...] = MODIFIERS
) -> tuple[str, tuple[str, ...]]:
    """``"cpu,paper_sampler"`` -> ("cpu", ("paper_sampler",)); an empty preset is the default.
    ``modifiers``: the valid ones (a config file's own, e.g. configs/reproduce.py's)."""
    name, *given = (preset or "").split(",")
    name = name or DEFAULT_PRESET
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {list(PRESETS)}")
    for m in given:
        if m not in modifiers:
            raise ValueError(f"unknown preset modifier {m!r}; valid: {list(modifiers)}")
    return name, tuple(given)


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    """The heterogeneous-regime config at the given preset (default ``cpu``), with modifiers."""
    preset, modifiers = parse_preset(preset)
    config = ml_collections.ConfigDict()
    config.preset = preset
    config.modifiers = ",".join(modifiers)
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    # A directory with the four MNIST IDX .gz files; empty: $FEDINF_MNIST_DIR, else TFDS.
    config.data.mnist_dir = ""
    # TFDS's data_dir for 'mnist' when no IDX directory is set; empty: TFDS's default
    # ($TFDS_DATA_DIR, else ~/tensorflow_datasets). Prepared there on first use (downloads).
    config.data.tfds_data_dir = ""
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
    config.model.block_out_channels = (8, 16, 32)
    config.model.layers_per_block = 1
    config.model.attention_levels = (False, False, True)
    config.model.up_attention_levels = (False, False, True)
    config.model.mid_attention = True
    config.model.norm_groups = 4
    config.model.num_heads = 2
    config.model.num_classes = 10
    config.model.class_embedding = True
    config.model.dtype = "float32"
    # > 1: a patch_size x patch_size pixel-unshuffle stem; the U-Net runs at 28 / patch_size.
    config.model.patch_size = 1
    # How the network's output is read (fedinf_jax/diffusion/score.py): "edm" (Karras et al. 2022
    # preconditioning; v-prediction under VP) or "eps" (noise prediction).
    config.model.parametrization = "edm"
    config.model.sigma_data = 0.5  # edm: the data's scale

    config.sde = ml_collections.ConfigDict()
    config.sde.name = "vp"
    config.sde.beta_min = 0.1
    config.sde.beta_max = 20.0
    config.sde.sigma_min = 0.01
    config.sde.sigma_max = 50.0
    config.sde.sigma = 25.0  # ve_paper
    config.sde.eps = 1e-5  # training t ~ U(eps, T)

    config.train = ml_collections.ConfigDict()
    # The defaults are the cpu preset (its budget: the curve point in docs/quality.md).
    config.train.num_steps = 2400
    config.train.batch_size = 32  # per agent
    config.train.learning_rate = 2e-3
    config.train.warmup_steps = 60
    config.train.end_lr_factor = 0.01
    config.train.weight_decay = 1e-4
    config.train.grad_clip = 1.0
    config.train.ema_decay = 0.999
    # Training times (fedinf_jax/diffusion/score.py): "uniform_t", t ~ U(sde.eps, T); "lognormal",
    # EDM's ln sigma ~ N(p_mean, p_std^2) for the noise level sigma = std / alpha; "log_snr", ln
    # sigma uniform between sigma(sde.eps) and sigma(T).
    config.train.noise = "uniform_t"
    config.train.p_mean = -1.2  # EDM's (Karras et al. 2022, Table 1)
    config.train.p_std = 1.2
    # Classifier-free guidance (Ho and Salimans 2022): the share of training examples whose
    # label is replaced by a null label (one more class of the model), so that each agent also
    # learns its unconditional score; > 0 lets sampler.guidance guide it. 0: no null label.
    # 0.1 for the cpu preset: docs/quality.md's guidance curve (its control agent at this budget
    # reads 0.99 as its digit at w = 2 with dropout 0.1 or 0.2; 0.1 costs less unguided).
    config.train.label_dropout = 0.1
    config.train.log_every = 50
    config.train.checkpoint_every = 200
    config.train.keep_checkpoints = 3

    # How the stacked agent axis is executed ("auto": per backend, see
    # fedinf_jax/agents/agent_axis.py).
    config.agent_axis = ml_collections.ConfigDict()
    config.agent_axis.train = "auto"
    config.agent_axis.score = "auto"
    # Agents per iteration of the "map" strategy's loop: on XLA:CPU, unrolled agents run side by
    # side on the threads, at that many times the body's compile time. 5 for the cpu preset's
    # K = 10 scores (docs/performance.md); 1 (compile once) for the others.
    config.agent_axis.map_unroll = 5 if preset == "cpu" else 1
    # How the U-Net's convolutions run (fedinf_jax/models/layers.py, Conv): "xla" (lax.conv),
    # "matmul" (matmuls over the channel axis) or "auto": on CPU "matmul" for layers of >= 128
    # input channels (the paper preset's), "xla" for narrower ones and on other backends.
    # Same parameters either way.
    config.conv_impl = "auto"

    # The device mesh (fedinf_jax/agents/sharding.py), used when there is more than one device: the
    # stacked agents are split along "agents", the sampler's batch along "batch" (sampling only).
    # agents x batch must equal the number of devices; agents = 0: all devices not on the batch
    # axis. K not a multiple of agents: zero agents pad the agent axis (never aggregated).
    config.mesh = ml_collections.ConfigDict()
    config.mesh.agents = 0
    config.mesh.batch = 1

    # Sampling (sample.py; fedinf_jax/sampling/federated_sampler.py). Times t run from T (noise) to
    # t_end (data).
    config.sampler = ml_collections.ConfigDict()
    config.sampler.method = "sde"  # "sde": reverse SDE; "ode": probability-flow ODE
    # Diffrax solver by name; ode: euler heun midpoint ralston bosh3 tsit5 dopri5 dopri8, and
    # the implicit implicit_euler kvaerno3 (their stages solved by root_finder);
    # sde: euler (Euler-Maruyama, the Ito solver) heun euler_heun milstein reversible_heun sea
    # shark sra1 spark general_shark slow_rk (Stratonovich; the noise is additive); on either
    # process the exponential integrators dpmpp_1 (DDIM on the ODE, DDPM's ancestral step on the
    # SDE) and dpmpp_2m (fedinf_jax/sampling/exponential.py). dpmpp_1 on the SDE: at equal
    # evaluations the cleanest digits of every solver measured (docs/quality.md, "Clean digits
    # at a few evaluations"); superdiff_or and superdiff_and track densities that only
    # Euler-Maruyama steps (--config.sampler.solver=euler).
    config.sampler.solver = "dpmpp_1"
    # The solver settings' defaults are the library's (fedinf_jax.sampling.solvers.SolverSpec,
    # RootFinder), except the number of steps and their grid (below).
    spec = solvers.SolverSpec
    # Constant steps (adaptive = False). 25 for the cpu preset: the ancestral step's digits are as
    # clean and as readable at 10 to 100 evaluations (docs/quality.md).
    config.sampler.num_steps = 25
    config.sampler.adaptive = spec.adaptive  # PIDController(rtol, atol) instead of constant steps
    config.sampler.rtol = spec.rtol
    config.sampler.atol = spec.atol
    # adaptive: give up after this many steps; constant steps: at most this many (their grid is
    # padded to max_steps + 1 times, an input of one compiled solve for every budget)
    config.sampler.max_steps = spec.max_steps
    # The implicit solvers' stage equations: Newton's method, its linear systems solved by
    # matrix-free GMRES (fedinf_jax.sampling.solvers.RootFinder); a step whose Newton iteration has
    # not converged within max_steps fails (adaptive steps: rejected and shortened).
    config.sampler.root_finder = ml_collections.ConfigDict(dataclasses.asdict(solvers.RootFinder()))
    config.sampler.t_end = spec.t_end  # stop the reverse process here (score_sde's eps)
    # Constant steps: "uniform" in t, "karras" (Karras et al.'s sigma schedule, rho = 7: short
    # steps near the data) or "log_snr" (uniform in log sigma); fedinf_jax/sampling/solvers.py,
    # tau_grid. Unused by adaptive steps (the controller places them).
    config.sampler.schedule = "karras"
    # The SDE's Brownian paths (fedinf_jax.sampling.solvers.BROWNIAN): "auto" (per-step draws for
    # constant steps, a tree for adaptive ones) or "tree" (the same path of each sample whatever the
    # steps).
    config.sampler.brownian = spec.brownian
    # A final Tweedie step x0 = (x + std^2 s) / alpha at t_end.
    config.sampler.denoise = spec.denoise
    # Classifier-free guidance w (Ho and Salimans 2022): s = s_null + w (s_y - s_null), the
    # federation's unconditional score s_null aggregated like its conditional one (at the null
    # label, whose prior is the label-free one; aggregators.guided). 1: unguided; > 1 needs agents
    # trained with train.label_dropout > 0. 2 for the cpu preset (docs/quality.md's curve: the
    # lowest w with accuracy >= 0.98 and noise <= 0.5%; FID 0.36 against 0.31 at its minimum,
    # w = 1.5, where accuracy is 0.979). The other presets and the paper's procedure: 1.
    config.sampler.guidance = 2.0
    # Guidance only where t_lo < t <= t_hi (Kynkaanniemi et al. 2024), the conditional score
    # alone elsewhere (aggregators.guided); (0, 1): the whole solve. The cpu preset's: their
    # interval for EDM2, noise levels sigma in (0.28, 5.42], in the VP SDE's t (docs/quality.md:
    # guidance at low noise amplifies the agents' faint errors into speckle).
    config.sampler.guidance_interval = (0.08, 0.58)
    # Autoguidance (Karras et al. 2024): guide with weaker versions of the same agents instead of
    # the null label, s = s_weak + w (s_y - s_weak): "N" (this run's checkpoint step N, kept by
    # training), "DIR" or "DIR@N" (another run with the same model and partition). "": none.
    config.sampler.guide = ""
    config.sampler.num_per_class = 10  # samples per digit
    config.sampler.batch_size = 100  # samples per jitted solve (memory bound)
    config.sampler.use_ema = True  # sample with the agents' EMA parameters
    config.sampler.seed = 0
    # > 0: also save the reverse process at this many times.
    config.sampler.save_trajectory = spec.save_trajectory
    config.sampler.checkpoint_step = -1  # -1: the latest checkpoint
    # A progress bar inside each solve (Diffrax's TqdmProgressMeter). Off: its host callbacks keep
    # the solve's program out of the persistent compilation cache (compiled again every run);
    # the log shows each batch and the ETA either way.
    config.sampler.progress = False

    # How the server combines the agents' scores (fedinf_jax/sampling/aggregators.py): ``name`` and
    # one section per member with settings, e.g. --config.aggregator.superdiff_or.temperature=0.5
    # (each setting is documented on its member's factory).
    config.aggregator = aggregators.config_section("mean")

    _apply_preset(config, preset)
    for modifier in modifiers:
        _apply_modifier(config, modifier)
    return config


def _apply_modifier(config: ml_collections.ConfigDict, modifier: str) -> None:
    if modifier == "paper_sampler":
        config.sampler.method = "ode"
        config.sampler.solver = "dopri5"
        config.sampler.adaptive = True
        config.sampler.t_end = 0.05
        config.sampler.denoise = False
        config.sampler.guidance = 1.0  # the paper's procedure is unguided
        config.sampler.guidance_interval = (0.0, 1.0)
        config.sampler.guide = ""
        config.aggregator.name = "mean"


def _apply_preset(config: ml_collections.ConfigDict, preset: str) -> None:
    if preset != "cpu":  # guidance is chosen at the cpu preset's budget only
        config.train.label_dropout = 0.0
        config.sampler.guidance = 1.0
        config.sampler.guidance_interval = (0.0, 1.0)
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
        config.sampler.num_steps = 8
        config.sampler.num_per_class = 2
        config.sampler.batch_size = 10
    elif preset == "demo":
        config.model.block_out_channels = (8, 16)
        config.model.attention_levels = (False, False)
        config.model.up_attention_levels = (False, False)
        config.model.mid_attention = False
        config.model.norm_groups = 4
        config.model.num_heads = 2
        config.train.num_steps = 150
        config.train.batch_size = 16
        config.train.warmup_steps = 15
        config.train.log_every = 25
        config.train.checkpoint_every = 150
        config.sampler.num_steps = 25
        config.sampler.num_per_class = 4
        config.sampler.batch_size = 40
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
        config.sampler.num_steps = 250


def for_regime(preset: str | None, partition: str, num_agents: int) -> ml_collections.ConfigDict:
    """A regime file's config: the base at ``preset`` with its partition and number of agents.

    The ``smoke`` preset caps the number of agents at 2 so that tests compile small programs.
    ``trimmed_mean``'s trim is capped so that it keeps an agent.
    """
    config = get_config(preset)
    config.partition.name = partition
    smoke = config.preset == "smoke"
    config.partition.num_agents = min(num_agents, 2) if smoke else num_agents
    aggregators.fit_to_agents(config.aggregator, config.partition.num_agents)
    return config
