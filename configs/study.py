"""A solver stability study (fedinf_jax/workflows/study.py) on a trained run's agents.

    python study.py --config=configs/study.py:cpu --workdir=runs/hetero_cpu
    python study.py --config=configs/study.py:smoke --workdir=runs/hetero_smoke \\
        --config.study.num_steps='(8, 16, 32)'

The run's checkpoint fixes the model, SDE and partition (as for sample.py); the ``sampler``
section gives what every cell shares (t_end, denoising, max_steps), the ``aggregator`` section
the aggregators' settings, and ``study`` the grid.
"""

import ml_collections

from configs import base


def get_config(preset: str | None = None):
    config = base.for_regime(preset, "heterogeneous", num_agents=10)
    s = config.study = ml_collections.ConfigDict()
    s.name = "default"  # results under WORKDIR/study/<name>/
    s.methods = ("ode", "sde")
    s.solvers = ml_collections.ConfigDict(
        {"ode": ("euler", "heun", "tsit5"), "sde": ("euler", "heun", "shark")}
    )
    # Aggregators, each a member with its settings after a colon as in reproduce.py's
    # procedures: "label_prior:top_k=1"; guidance is an axis this way, "mean:guidance=2".
    s.aggregators = ("mean", "label_prior", "superdiff_or")
    s.num_steps = (10, 25, 50, 100)  # constant budgets, on each schedule
    s.schedules = ("uniform", "karras")
    s.tolerances = (1e-2, 1e-3)  # adaptive budgets (rtol = atol), for solvers with an estimate
    s.num_per_class = 10  # samples per digit, all cells on the same draws and Brownian paths
    s.seed = 0
    # A reproduce.py run's classifier/ folder: each cell's accuracy, noise rate, FID against the
    # MNIST test set, and its error to the reference in the classifier's feature space. "" : none.
    s.classifier = ""
    s.reference = ml_collections.ConfigDict(
        {"ode_solver": "dopri8", "ode_tol": 1e-6, "sde_steps": 1024}
    )
    if config.preset == "cpu":  # the worked study of docs/study_cpu.md, under an hour here
        s.name = "cpu"
        s.num_steps = (8, 16, 32, 64)
        s.schedules = ("uniform",)
        # Two draws per digit: the errors to the reference are averaged over 20 samples and
        # their pixels; accuracy and FID on 20 samples are coarse (docs/study_cpu.md).
        s.num_per_class = 2
        s.classifier = "runs/reproduce_cpu/classifier"
        # The references: 8x the finest SDE budget; dopri8 at 1e-4 beside the cells' 1e-3.
        s.reference.ode_tol = 1e-4
        s.reference.sde_steps = 512
    if config.preset == "smoke":
        s.methods = ("ode",)
        s.solvers = ml_collections.ConfigDict({"ode": ("euler", "heun"), "sde": ("euler",)})
        s.aggregators = ("mean",)
        s.num_steps = (4, 8)
        s.schedules = ("uniform",)
        s.tolerances = ()
        s.num_per_class = 1
        s.reference.ode_solver, s.reference.ode_tol = "tsit5", 1e-4
    return config
