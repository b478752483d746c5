"""Pixel fidelity against score evaluations: every sampler family on the shipped federations.

    python -m benchmarks.quality.fidelity_frontier --workdir=runs/fidelity_frontier
    python -m benchmarks.quality.fidelity_frontier --sets=control:mean --samplers=em,ancestral \\
        --budgets=10,25

For each sample set (a shipped federation and a procedure, ``SETS``), each sampler (a set of
``sampler`` overrides, ``SAMPLERS``) and each budget of score evaluations per sample, draws
``--per_class`` images of every digit, guided as the ``cpu`` preset samples (w = 2), on the same
prior draws and labels, and measures them with the shipped classifier against the repository's
MNIST test digits: accuracy, noise rate, FID, and the pixels' background speckle, black share and
grey-level distance (``fedinf_jax.evaluation.metrics``). A budget of E evaluations takes
round(E / stages) steps of a solver with that many evaluations per step (plus the final Tweedie
step); an adaptive sampler takes the tolerances ``ADAPTIVE_TOLERANCES`` instead. Samplers that
differ only in steps or schedule share one compiled solve (``FederatedSampler.with_budget``).

Each cell is kept as ``--workdir/<set>/<sampler>/<budget>.{npz,json}``: a rerun computes only
what is missing. Writes ``--output`` (JSON, a row per cell), the Markdown table and a figure of
speckle, accuracy and FID against evaluations beside it, and the 25-evaluation grids.
"""

import os
import time

import numpy as np
from absl import app, flags, logging

from benchmarks.common import timing
from configs import control, hetero
from fedinf_jax.core import files, runtime
from fedinf_jax.data import digits
from fedinf_jax.evaluation import metrics, sample_sets
from fedinf_jax.sampling import federated_sampler
from fedinf_jax.workflows import plots, sample_lib

# Each set: (shipped run, regime config file, procedure).
SETS = {
    "control:mean": ("pretrained/cpu/control", control, "mean"),
    "heterogeneous:mean": ("pretrained/cpu/heterogeneous", hetero, "mean"),
    "heterogeneous:label_prior:top_k=1": (
        "pretrained/cpu/heterogeneous",
        hetero,
        "label_prior:top_k=1",
    ),
    "heterogeneous:label_prior": ("pretrained/cpu/heterogeneous", hetero, "label_prior"),
}


def _sampler(method: str, solver: str, stages: int = 1, **settings) -> dict:
    """A sampler's overrides of the ``sampler`` section, with its score evaluations per step
    (``stages``, not a config field); on Karras's grid unless it says otherwise."""
    return {"method": method, "solver": solver, "stages": stages, "schedule": "karras", **settings}


# Each sampler: overrides of the config's ``sampler`` section; constant steps unless adaptive.
SAMPLERS = {
    # The reverse SDE with Euler-Maruyama: the demo's (uniform in t), and on Karras's grid.
    "em": _sampler("sde", "euler", schedule="uniform"),
    "em_karras": _sampler("sde", "euler"),
    # The SDE's Stratonovich Heun (two evaluations a step).
    "sde_heun_karras": _sampler("sde", "heun", 2),
    # The probability-flow ODE: Euler, Heun (EDM's sampler without churn), and adaptive Tsit5.
    "ode_euler_karras": _sampler("ode", "euler"),
    "ode_heun_karras": _sampler("ode", "heun", 2),
    "ode_tsit5_adaptive": _sampler("ode", "tsit5", 6, adaptive=True, schedule="uniform"),
    # The exponential integrators: DDPM's ancestral step (dpmpp_1 on the SDE), on each grid;
    # DDIM (dpmpp_1 on the ODE); DPM-Solver++(2M) on each process.
    "ancestral": _sampler("sde", "dpmpp_1"),
    "ancestral_uniform": _sampler("sde", "dpmpp_1", schedule="uniform"),
    "ancestral_log_snr": _sampler("sde", "dpmpp_1", schedule="log_snr"),
    "sde_dpmpp_2m": _sampler("sde", "dpmpp_2m"),
    "ddim": _sampler("ode", "dpmpp_1"),
    "ode_dpmpp_2m": _sampler("ode", "dpmpp_2m"),
    # How the solve ends: stopped at t_end = 0.03 (sigma 0.11) before Tweedie's step; the
    # ancestral step's last state without Tweedie's step.
    "em_karras_tend0.03": _sampler("sde", "euler", t_end=0.03),
    "ancestral_tend0.03": _sampler("sde", "dpmpp_1", t_end=0.03),
    "ancestral_no_tweedie": _sampler("sde", "dpmpp_1", denoise=False),
    # Guidance limited to t > 0.1 (sigma > 0.34), the conditional score below; and to the
    # interval Kynkaanniemi et al. found for EDM2, sigma in (0.28, 5.42], t in (0.08, 0.58]:
    # the cpu preset's sampler.
    "ancestral_interval": _sampler("sde", "dpmpp_1", guidance_interval=(0.1, 1.0)),
    "ancestral_edm2_interval": _sampler("sde", "dpmpp_1", guidance_interval=(0.08, 0.58)),
    "em_karras_interval": _sampler("sde", "euler", guidance_interval=(0.1, 1.0)),
}
# The adaptive sampler's budgets: its tolerances (rtol = atol), loosest first.
ADAPTIVE_TOLERANCES = (3e-2, 1e-2, 3e-3, 1e-3)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/fidelity_frontier", "Where the cells are kept (resumable).")
flags.DEFINE_list("sets", list(SETS), f"Sample sets; known: {sorted(SETS)}.")
flags.DEFINE_list("samplers", list(SAMPLERS), f"Samplers; known: {sorted(SAMPLERS)}.")
flags.DEFINE_list("budgets", ["10", "25", "50", "100", "250"], "Score evaluations per sample.")
flags.DEFINE_integer("per_class", 10, "Samples of each digit per cell.")
flags.DEFINE_integer("batch_size", 100, "Samples per jitted solve.")
flags.DEFINE_string("classifier", "pretrained/cpu/classifier", "The evaluation classifier.")
flags.DEFINE_string("mnist_dir", "data/mnist_subset", "MNIST IDX folder (the test digits).")
flags.DEFINE_bool("report_only", False, "Sample nothing: tabulate and plot the cells kept.")
flags.DEFINE_string(
    "output",
    "benchmarks/results/fidelity_frontier_cpu.json",
    "Results JSON; the .md table and .png figure go beside it.",
)


def budgets_of(name: str) -> list[str]:
    """A sampler's budgets: ``--budgets`` (evaluations per sample) for constant steps, else
    ``ADAPTIVE_TOLERANCES`` as "tol<rtol = atol>"."""
    if SAMPLERS[name].get("adaptive"):
        return [f"tol{tol:g}" for tol in ADAPTIVE_TOLERANCES]
    return list(FLAGS.budgets)


def sampler_config(config, overrides: dict, budget: str):
    """``config`` with a sampler's ``overrides`` and ``budget`` (``budgets_of``): round(E /
    stages) constant steps for E evaluations, or an adaptive solve's tolerance."""
    cfg = config.copy_and_resolve_references()
    for key, value in overrides.items():
        if key != "stages":
            cfg.sampler[key] = value
    if budget.startswith("tol"):
        cfg.sampler.rtol = cfg.sampler.atol = float(budget[3:])
    else:
        cfg.sampler.num_steps = max(1, round(int(budget) / overrides["stages"]))
    cfg.sampler.progress = False
    return cfg


def run_cell(federation, procedure: str, name: str, budget: str, real, clf, path: str) -> dict:
    """One cell: sampled and measured, or read back from ``path`` (.json beside .npz). The cells
    of a sampler share its first cell's compiled solve (``with_budget``)."""
    if os.path.exists(path + ".json"):
        return files.read_json(path + ".json")
    cfg = sampler_config(federation.config, SAMPLERS[name], budget)
    key = (id(federation), procedure, name)
    if key not in _SAMPLERS_BUILT:
        fed = sample_lib.Restored(**{**federation.__dict__, "config": cfg})
        _SAMPLERS_BUILT[key] = sample_lib.build_sampler(fed, procedure=procedure)
    fields = ("rtol", "atol") if cfg.sampler.adaptive else ("num_steps",)
    sampler = _SAMPLERS_BUILT[key].with_budget(**{f: cfg.sampler[f] for f in fields})
    labels = sample_lib.class_labels(FLAGS.per_class)
    start = time.perf_counter()
    drawn = sample_lib.sample_in_batches(
        sampler, federation.sampler_params, labels, FLAGS.batch_size, 0
    )
    wall = time.perf_counter() - start
    pixels = federated_sampler.to_uint8(drawn.images)
    measured = sample_sets.evaluate_sample_set(clf, real, pixels, labels)
    row = dict(
        measured,
        sampler=name,
        budget=budget,
        num_steps=cfg.sampler.num_steps,
        score_evaluations=round(float(np.mean(drawn.per_batch["score_evaluations"]))),
        wall_s=round(wall, 2),
        sampler_settings={k: v for k, v in SAMPLERS[name].items() if k != "stages"},
    )
    np.savez_compressed(path + ".npz", images=pixels, labels=labels)
    files.write_json(path + ".json", row)
    return row


_SAMPLERS_BUILT = {}


def run_set(set_name: str, real, clf) -> list[dict]:
    workdir, regime, procedure = SETS[set_name]
    config = regime.get_config("cpu")
    config.data.mnist_dir = FLAGS.mnist_dir
    federation = None
    rows = []
    for name in FLAGS.samplers:
        for budget in budgets_of(name):
            path = os.path.join(FLAGS.workdir, set_name.replace(":", "_"), name, budget)
            if FLAGS.report_only and not os.path.exists(path + ".json"):
                continue
            if federation is None and not os.path.exists(path + ".json"):
                federation = sample_lib.load_federation(config, workdir)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            row = run_cell(federation, procedure, name, budget, real, clf, path)
            rows.append(dict(row, set=set_name))
            logging.info(
                "%s %s %s: %d evals, speckle %.4f, accuracy %.3f, FID %.2f (%.0f s)",
                set_name, name, budget, row["score_evaluations"], row["speckle"],
                row["accuracy"], row["fid"], row["wall_s"],
            )  # fmt: skip
    return rows


def write_outputs(rows: list[dict], real: dict) -> None:
    base = os.path.splitext(FLAGS.output)[0]
    files.write_json(FLAGS.output, {"real_test_digits": real, "rows": rows})
    head = ["set", "sampler", "score evals", "speckle", "black", "grey dist.", "accuracy"]
    head += ["noise rate", "FID", "s"]
    real_cells = [f"{real['speckle']:.4f}", f"{real['black']:.3f}", "0"]
    table = [["real test digits", "-", "-", *real_cells, "-", "-", "-", "-"]]
    for r in rows:
        pixels = [f"{r['speckle']:.4f}", f"{r['black']:.3f}", f"{r['grey_distance']:.3f}"]
        quality = [f"{r['accuracy']:.3f}", f"{r['noise_rate']:.3f}", f"{r['fid']:.2f}"]
        table.append(
            [
                r["set"],
                r["sampler"],
                r["score_evaluations"],
                *pixels,
                *quality,
                f"{r['wall_s']:.0f}",
            ]
        )
    files.write_text(base + ".md", timing.markdown_table(head, table, numeric_from=2))
    plot_frontier(rows, real, base + ".png")


def plot_frontier(rows: list[dict], real: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["set"] for r in rows})
    metrics_shown = (("speckle", "background speckle"), ("accuracy", "accuracy"), ("fid", "FID"))
    fig, axes = plt.subplots(len(sets), 3, figsize=(15, 3.6 * len(sets)), squeeze=False)
    for i, set_name in enumerate(sets):
        for j, (key, label) in enumerate(metrics_shown):
            ax = axes[i, j]
            for k, name in enumerate(SAMPLERS):
                pts = sorted(
                    (r["score_evaluations"], r[key])
                    for r in rows
                    if r["set"] == set_name and r["sampler"] == name
                )
                if pts:
                    style = "-o" if len(pts) > 1 else "s"
                    color = plt.cm.tab20(k % 20)  # one colour per sampler on every panel
                    ax.plot(*zip(*pts, strict=True), style, label=name, ms=3, color=color)
            if key == "speckle":
                ax.axhline(real["speckle"], color="k", ls=":", label="real digits")
                ax.set_yscale("log")
            ax.set_xscale("log")
            ax.set_xlabel("score evaluations per sample")
            ax.set_title(f"{set_name}: {label}", fontsize=9)
    axes[0, 0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# The samplers whose 25-evaluation cells are drawn (``grids``).
GRID_SAMPLERS = ("em", "em_karras", "ode_heun_karras", "ancestral", "ancestral_edm2_interval")


def grids(rows: list[dict], budget: str = "25") -> None:
    """The grids of the ``GRID_SAMPLERS`` cells at ``budget``: one PNG per set and sampler
    beside the output."""
    outdir = os.path.splitext(FLAGS.output)[0] + "_grids"
    for r in rows:
        if r["budget"] != budget or r["sampler"] not in GRID_SAMPLERS:
            continue
        cell = os.path.join(FLAGS.workdir, r["set"].replace(":", "_"), r["sampler"], budget)
        with np.load(cell + ".npz") as f:
            images, labels = f["images"], f["labels"]
        shown = plots.first_per_class(labels, 10)
        title = f"{r['set']}, {r['sampler']}, {r['score_evaluations']} evaluations"
        name = f"{r['set'].replace(':', '_')}-{r['sampler']}.png"
        os.makedirs(outdir, exist_ok=True)
        plots.plot_sample_grid(images[shown], labels[shown], os.path.join(outdir, name), title)


# The cells whose lit pixels are mapped (``speckle_maps``): (sampler, budget).
MAP_CELLS = (
    ("em", "25"),
    ("ode_heun_karras", "25"),
    ("ancestral", "25"),
    ("ancestral_edm2_interval", "25"),
)


def speckle_maps(rows: list[dict], real_images: np.ndarray) -> None:
    """Where the speckle lies: per set, the share of images in which each pixel is brighter than
    ``metrics.SPECKLE_LEVEL``, for the real test digits and the ``MAP_CELLS``, with the border
    ring that ``background_speckle`` reads outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({r["set"] for r in rows})
    maps = [("real test digits", real_images)]
    for set_name in sets:
        for sampler, budget in MAP_CELLS:
            cell = os.path.join(FLAGS.workdir, set_name.replace(":", "_"), sampler, budget)
            if os.path.exists(cell + ".npz"):
                with np.load(cell + ".npz") as f:
                    maps.append((f"{set_name}\n{sampler}, {budget} evaluations", f["images"]))
    cols = 5
    rows_of_maps = -(-len(maps) // cols)
    fig, axes = plt.subplots(rows_of_maps, cols, figsize=(3 * cols, 3.8 * rows_of_maps))
    for ax in axes.ravel():
        ax.axis("off")
    ring = metrics.SPECKLE_RING - 0.5
    for ax, (title, images) in zip(axes.ravel(), maps, strict=False):
        lit = (images > metrics.SPECKLE_LEVEL).mean(axis=0)
        ax.imshow(lit, cmap="magma", vmin=0.0, vmax=0.2)
        ax.add_patch(
            plt.Rectangle((ring, ring), 27 - 2 * ring, 27 - 2 * ring, fill=False, color="c")
        )
        speckle = metrics.background_speckle(images)
        ax.set_title(f"{title}\nspeckle {speckle:.2%}", fontsize=7)
    fig.suptitle("share of images with the pixel above 10 grey levels (0 to 20%)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.splitext(FLAGS.output)[0] + "_speckle_maps.png", dpi=90)
    plt.close(fig)


def main(argv):
    del argv
    for name in FLAGS.sets:
        if name not in SETS:
            raise app.UsageError(f"unknown set {name!r}; valid: {sorted(SETS)}")
    for name in FLAGS.samplers:
        if name not in SAMPLERS:
            raise app.UsageError(f"unknown sampler {name!r}; valid: {sorted(SAMPLERS)}")
    runtime.setup()
    mnist = digits.load_mnist(FLAGS.mnist_dir, None)
    clf, real = sample_sets.load_evaluator(FLAGS.classifier, mnist)
    rows = [row for name in FLAGS.sets for row in run_set(name, real, clf)]
    # The real test digits' pixel measures: what a perfect sampler reads.
    write_outputs(rows, metrics.fidelity(real.images, real.images))
    grids(rows)
    speckle_maps(rows, real.images)
    logging.info("%d cells: %s", len(rows), FLAGS.output)


if __name__ == "__main__":
    app.run(main)
