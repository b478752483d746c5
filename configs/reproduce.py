"""The reproduction pipeline (reproduce.py, fedinf_jax/workflows/pipeline.py): what to train, sample
and measure. ``--config=configs/reproduce.py:PRESET`` with PRESET the regimes' model preset
(smoke, demo, cpu, paper).
"""

import ml_collections

from configs import base, control, hetero, homo
from configs import classifier as classifier_config

# Samples per digit for FID/IS/accuracy; the grids (samples.png) show the first 10.
_EVAL_PER_CLASS = {"smoke": 2, "demo": 4, "cpu": 20, "paper": 100}
# The sets a result rests on (the control's mean, each regime's best procedure), sampled again.
_CLAIM_PER_CLASS = {"smoke": 1, "demo": 0, "cpu": 100, "paper": 100}
_CLASSIFIER_PRESET = {"smoke": "smoke", "demo": "demo", "cpu": "cpu", "paper": "cpu"}
# Each regime's run config file (configs/<file>.py), as train.py takes it.
REGIME_FILES = {"control": control, "homogeneous": homo, "heterogeneous": hetero}


# The heterogeneity sweep's partitions (the Flower and NIID-Bench conventions: Dirichlet label
# skew, and pathological shards of 1 or 2 classes per agent), from near-IID to one digit each,
# with the pooled control; reproduce.py:PRESET,sweep turns it on, and PRESET,scaling the number
# of agents K of the paper's heterogeneous split instead (K_SCALING_PARTITIONS).
SWEEP_PARTITIONS = (
    "control",
    "dirichlet:alpha=10.0",
    "dirichlet:alpha=1.0",
    "dirichlet:alpha=0.3",
    "dirichlet:alpha=0.1",
    "pathological:classes_per_agent=2",
    "pathological:classes_per_agent=1",
)
K_SCALING_PARTITIONS = tuple(f"heterogeneous:num_agents={k}" for k in (2, 5, 10, 20))
_SWEEPS = {"": (), "sweep": SWEEP_PARTITIONS, "scaling": K_SCALING_PARTITIONS}
_SWEEP_TITLES = {"": "heterogeneity sweep", "sweep": "heterogeneity sweep", "scaling": "K scaling"}


# The shipped runs' data: MNIST's first 6,000 training and 1,000 test digits, kept in the
# repository (data/README.md), so that ``PRESET,shipped`` needs no download.
SHIPPED_MNIST_DIR = "data/mnist_subset"
_MODIFIERS = (*(m for m in _SWEEPS if m), "shipped")


def tracking_solver(preset: str) -> str:
    """The sampler settings of the members whose state moves with the path (superdiff_or,
    superdiff_and): Euler-Maruyama, with the cpu preset's 100 steps, where its digits are
    cleanest (docs/quality.md), at the others' own steps."""
    return "solver=euler,num_steps=100" if preset == "cpu" else "solver=euler"


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    preset, modifiers = base.parse_preset(preset, _MODIFIERS)
    if len(modifiers) > 1:
        raise ValueError(f"one preset modifier at most, got {list(modifiers)}")
    modifier = modifiers[0] if modifiers else ""
    config = ml_collections.ConfigDict()
    config.preset = preset
    config.regimes = ("control", "homogeneous", "heterogeneous")
    # A folder of shipped runs (pretrain.py; e.g. "pretrained/cpu"): its regimes and classifier
    # are used as they are, verified and checked against this config, instead of training them
    # under the outdir. Empty: train them.
    config.pretrained = ""
    # Where MNIST comes from, for every stage (classifier, regimes, metrics); fields as in
    # base.get_config().data: an IDX directory, else TFDS in tfds_data_dir.
    config.data = ml_collections.ConfigDict()
    config.data.mnist_dir = ""
    config.data.tfds_data_dir = ""
    # "paper": the paper's procedure (configs/base.py, paper_sampler); the others: the corrected
    # sampler with that aggregator, at its defaults or with settings after a colon
    # ("label_prior:top_k=1"; fedinf_jax.workflows.pipeline.parse_procedure). With one agent every
    # aggregator is the agent, so the control regime runs only "paper" and "mean". The
    # density-weighted members track each agent's density along the path, which only
    # Euler-Maruyama steps (the sampler's exponential integrator steps the images alone): they are
    # sampled with it (``tracking``).
    em = tracking_solver(preset)
    config.procedures = (
        "paper",
        "mean",
        "label_prior",
        f"superdiff_or:{em}",
        "schedule",
        f"superdiff_and:{em}",
        "weighted",
        "median",
        "trimmed_mean",
        # The baselines routing gives: one agent per sample, and the top-k sparse routers.
        "route",
        "label_prior:top_k=1",
        "label_prior:top_k=2",
        f"superdiff_or:top_k=1,{em}",
        f"superdiff_or:top_k=2,{em}",
    )
    if preset == "demo":  # minutes: the paper's procedure, the corrected mean, the mixture
        config.procedures = ("paper", "mean", f"superdiff_or:{em}")
    # Members whose reverse process is saved at this many times, for the agents' weights along
    # it (weights.png; the density-weighted members), under every procedure of theirs.
    config.trajectory_procedures = ("superdiff_or",)
    config.trajectory_times = 11
    config.eval_per_class = _EVAL_PER_CLASS[preset]
    config.claim_per_class = _CLAIM_PER_CLASS[preset]
    # The evaluation classifier's config (configs/classifier.py) and each regime's run config
    # (configs/control.py, homo.py, hetero.py at the preset): what the pipeline trains.
    config.classifier = classifier_config.get_config(_CLASSIFIER_PRESET[preset])
    config.runs = ml_collections.ConfigDict(
        {regime: module.get_config(preset) for regime, module in REGIME_FILES.items()}
    )
    # The corrected sampler (every regime and aggregator); fields as in base.get_config().sampler.
    config.sampler = base.get_config(preset).sampler
    # The paper's procedure (the ``paper_sampler`` modifier): its sampler, with the uniform mean.
    config.paper_sampler = base.get_config(f"{preset},paper_sampler").sampler
    config.agreement_samples = 10  # S in the paper's eqs. 11-13
    # Aggregates measured besides the paper's mean (at a fixed point superdiff_or's weights are
    # its prior's, i.e. label_prior's; superdiff_and's needs only the agents' scores there).
    config.agreement_aggregators = ("label_prior", "superdiff_and")
    config.agreement_times = (1.0, 0.5, 0.1, 0.01)
    config.seed = 0
    # The heterogeneity sweep (off unless partitions are given; PRESET,sweep gives
    # SWEEP_PARTITIONS, PRESET,scaling K_SCALING_PARTITIONS): for each partition and seed,
    # num_agents agents (or the spec's own num_agents) trained at the preset (the
    # heterogeneous regime's run config with that partition; one agent for "control"), sampled
    # under each of its procedures; mean and standard error over the seeds in report.md,
    # sweep.json and sweep.png. Each seed draws the partition and the training anew.
    config.sweep = ml_collections.ConfigDict()
    config.sweep.partitions = _SWEEPS.get(modifier, ())
    # report.md's section and sweep.png's title
    config.sweep.title = _SWEEP_TITLES.get(modifier, _SWEEP_TITLES[""])
    config.sweep.seeds = (0, 1, 2)
    config.sweep.num_agents = 10
    config.sweep.procedures = ("mean", "label_prior", f"superdiff_or:{em}", "route")
    if modifier == "shipped":
        _use_shipped(config, preset)
    return config


def _use_shipped(config: ml_collections.ConfigDict, preset: str) -> None:
    """``PRESET,shipped`` (``make demo``): the runs shipped in pretrained/PRESET instead of
    training, the repository's MNIST digits, and sets small enough for minutes: the paper's
    procedure, the corrected mean, the label-weighted mixture and each digit's owner alone
    (docs/quality.md), 10 samples per digit, no claim sets. (The density-weighted members need
    Euler-Maruyama, whose digits are clean at 100 steps, not at the demo's 25.)"""
    config.pretrained = f"pretrained/{preset}"
    config.data.mnist_dir = SHIPPED_MNIST_DIR
    config.procedures = ("paper", "mean", "label_prior", "label_prior:top_k=1")
    config.trajectory_procedures = ()
    config.eval_per_class = 10
    config.claim_per_class = 0
