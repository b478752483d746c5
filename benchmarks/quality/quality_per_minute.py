"""Sample quality of a control agent against the training time it cost, per training recipe.

    python -m benchmarks.quality.quality_per_minute --workdir=runs/quality_per_minute
    python -m benchmarks.quality.quality_per_minute --recipes=baseline --steps=150,300,600,900,1200

For each recipe (a named set of config overrides, ``RECIPES``) and each step budget, one control
agent (``configs/control.py:PRESET``, all 60,000 training images) is trained from scratch with
``train.num_steps`` set to that budget, so that its schedule ends there, as a run of that length
would (warm-up capped at a tenth of the budget). It is then sampled with the preset's sampler
(``--per_class`` images of each digit) and scored with the reproduction's classifier (trained
here at its ``cpu`` preset if ``--classifier`` holds none): label accuracy, noise rate (max
softmax < 0.5) and FID against the MNIST test set in the classifier's features. The training time
is measured around the training call (wall and process CPU seconds, compilation included), beside
the fp32 matrix-product ceiling of the machine at that moment (numpy 4096 x 4096 sgemm).

Each trained cell is sampled with every sampler of ``--samplers`` (``SAMPLERS``). Every cell is
kept under ``--workdir/RECIPE/steps_N`` (checkpoint, cost.json, samples/SAMPLER/ with its
metrics.json): a rerun computes only what is missing. Writes ``--output`` (JSON: one row per cell),
the Markdown table beside it, and a PNG of the three metrics against training minutes.
"""

import json
import os
import resource
import time

import ml_collections
from absl import app, flags, logging

from benchmarks.common import timing
from benchmarks.common.candidates import candidate
from configs import classifier as classifier_config
from configs import control
from fedinf_jax.agents import runs
from fedinf_jax.core import files, runtime
from fedinf_jax.data import digits
from fedinf_jax.evaluation import classifier, sample_sets
from fedinf_jax.workflows import federation, train_lib

# Each recipe: the config overrides it applies to the preset (dotted keys; "architecture" names a
# U-Net of candidates.py, whose model overrides apply). "baseline" spells out
# the recipe the presets had when this benchmark was written, so that it stays comparable when
# the defaults change.
RECIPES = {
    "baseline": {
        "train.batch_size": 32,
        "train.learning_rate": 2e-3,
        "train.warmup_steps": 60,
        "train.ema_decay": 0.999,
        "model.parametrization": "edm",
        "train.noise": "uniform_t",
        "train.label_dropout": 0.0,
    },
    # EDM's training noise distribution (ln sigma ~ N(-1.2, 1.2^2)), the rest as baseline.
    "lognormal": {
        "train.batch_size": 32,
        "train.learning_rate": 2e-3,
        "train.warmup_steps": 60,
        "train.ema_decay": 0.999,
        "model.parametrization": "edm",
        "train.noise": "lognormal",
        "train.label_dropout": 0.0,
    },
}
# ln sigma uniform over the SDE's range: as often at high noise (where the digit's shape is
# decided) as at low noise (where its strokes are cleaned), the rest as baseline.
RECIPES["log_snr"] = dict(RECIPES["baseline"], **{"train.noise": "log_snr"})
# Classifier-free guidance's training: the baseline with each label replaced by the null label
# 10% or 20% of the time (the agent learns its unconditional score too).
for _p in (10, 20):
    RECIPES[f"dropout{_p}"] = dict(RECIPES["baseline"], **{"train.label_dropout": _p / 100})
# The baseline's training with another U-Net of candidates.py.
for _name in ("wide16", "wide32", "wide_noattn", "two_level", "stem32", "stem64", "stem3"):
    RECIPES[_name] = dict(RECIPES["baseline"], architecture=_name)

# Each sampler: overrides of the config's ``sampler`` section. Every trained cell is sampled with
# each sampler asked for, so samplers compare on the same agents.
SAMPLERS = {
    # The cpu preset's: reverse SDE, Euler-Maruyama, 100 steps uniform in t (100 evaluations).
    "em100": {
        "method": "sde",
        "solver": "euler",
        "num_steps": 100,
        "schedule": "uniform",
        "guidance": 1.0,
        "guidance_interval": (0.0, 1.0),  # guided over the whole solve, as when measured
    },
    # Probability-flow ODE, Heun, 18 steps on Karras et al.'s sigma schedule (36 evaluations).
    "heun18_karras": {"method": "ode", "solver": "heun", "num_steps": 18, "schedule": "karras"},
    # The two at equal evaluations: Heun with em100's 101, Euler-Maruyama with heun18's 37.
    "heun50_karras": {"method": "ode", "solver": "heun", "num_steps": 50, "schedule": "karras"},
    "em36": {"method": "sde", "solver": "euler", "num_steps": 36, "schedule": "uniform"},
    # Euler-Maruyama with its 100 steps on the Karras schedule (short steps near the data).
    "em100_karras": {"method": "sde", "solver": "euler", "num_steps": 100, "schedule": "karras"},
    # The demo preset's 25 Euler-Maruyama steps, uniform in t and on the Karras schedule.
    "em25": {"method": "sde", "solver": "euler", "num_steps": 25, "schedule": "uniform"},
    "em25_karras": {"method": "sde", "solver": "euler", "num_steps": 25, "schedule": "karras"},
}
# em100 with classifier-free guidance w (sampler.guidance; 1 is em100): for the dropout recipes,
# skipped for a recipe trained without the null label.
for _w in (1.5, 2, 3, 4):
    SAMPLERS[f"em100_w{_w:g}"] = dict(SAMPLERS["em100"], guidance=float(_w))

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/quality_per_minute", "Where the cells are kept (resumable).")
flags.DEFINE_string("preset", "cpu", "The control agent's preset (configs/base.py).")
flags.DEFINE_list("recipes", list(RECIPES), f"Recipes to run; known: {sorted(RECIPES)}.")
flags.DEFINE_list(
    "steps",
    ["150", "300", "600", "1200", "2400"],
    "Step budgets up to the cpu preset's: one agent trained per budget.",
)
flags.DEFINE_list("samplers", ["em100"], f"Samplers per trained cell; known: {sorted(SAMPLERS)}.")
flags.DEFINE_integer("per_class", 20, "Samples of each digit per cell.")
flags.DEFINE_bool(
    "report_only",
    False,
    "Compute nothing: tabulate and plot the cells already under --workdir for these recipes, "
    "samplers and budgets, skipping the missing ones.",
)
flags.DEFINE_string("classifier", None, "A classifier/ folder (default WORKDIR/classifier).")
flags.DEFINE_string(
    "classifier_preset",
    "cpu",
    "The classifier's preset when one is trained (configs/classifier.py).",
)
flags.DEFINE_string(
    "output",
    "benchmarks/results/quality_per_minute_cpu.json",
    "Results JSON; the .md table and .png go beside it.",
)


def recipe_config(preset: str, recipe: str, steps: int) -> ml_collections.ConfigDict:
    """The control config at ``preset`` with ``recipe``'s overrides, trained for ``steps``."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; valid: {sorted(RECIPES)}")
    config = control.get_config(preset)
    for key, value in RECIPES[recipe].items():
        if key == "architecture":
            config.model.update(candidate(value)[1])
            continue
        section, field = key.split(".")
        if field not in config[section]:
            raise ValueError(f"recipe {recipe!r} sets {key}, which configs/base.py does not have")
        config[section][field] = value
    config.train.num_steps = steps
    config.train.warmup_steps = min(config.train.warmup_steps, max(1, steps // 10))
    config.train.checkpoint_every = steps
    config.train.log_every = max(1, min(config.train.log_every, steps // 4))
    config.sampler.progress = False
    return config


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_cell(config, workdir: str) -> dict:
    """Trains (or finds trained) one cell; returns its cost record (``cost.json``)."""
    path = os.path.join(workdir, "cost.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    resumed = os.path.isdir(os.path.join(workdir, "checkpoints"))
    ceiling = timing.sgemm_gflops()
    wall, cpu = time.perf_counter(), _cpu_seconds()
    train_lib.train(config, workdir)
    cost = {
        "train_wall_s": time.perf_counter() - wall,
        "train_cpu_s": _cpu_seconds() - cpu,
        "sgemm_gflops_before": ceiling,
        "sgemm_gflops_after": timing.sgemm_gflops(),
        "resumed": resumed,  # a resumed cell's time covers only the steps after the resume
        "images": config.train.num_steps * config.train.batch_size,
    }
    files.write_json(path, cost)
    return cost


def run_cell(recipe, steps, clf, real) -> list[dict]:
    """One trained cell's rows, one per sampler in ``--samplers``."""
    config = recipe_config(FLAGS.preset, recipe, steps)
    workdir = os.path.join(FLAGS.workdir, recipe, f"steps_{steps}")
    rows = []
    if FLAGS.report_only and not os.path.exists(os.path.join(workdir, "cost.json")):
        return rows
    cost = train_cell(config, workdir)
    for sampler in FLAGS.samplers:
        metrics_path = os.path.join(workdir, "samples", sampler, "metrics.json")
        if FLAGS.report_only and not os.path.exists(metrics_path):
            continue
        guidance = SAMPLERS[sampler].get("guidance", 1.0)
        if guidance != 1 and not runs.guidable(config):
            logging.info("%s: no null label in recipe %s, not guided", sampler, recipe)
            continue
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                metrics = json.load(f)
        else:
            config.sampler.update(SAMPLERS[sampler])
            config.sampler.num_per_class = FLAGS.per_class
            sample_dir = federation.run(config, workdir, os.path.dirname(metrics_path))
            metrics = sample_sets.evaluate_sample_dir(clf, real, sample_dir)
            files.write_json(metrics_path, metrics)
        keep = ("accuracy", "noise_rate", "fid", "num_samples", "score_evaluations")
        rows.append(
            dict(
                recipe=recipe,
                sampler=sampler,
                steps=steps,
                batch_size=config.train.batch_size,
                train_minutes=cost["train_wall_s"] / 60,
                sampling_s=metrics["sampling_wall_time_s"],
                guidance=guidance,
                label_dropout=config.train.label_dropout,
                **cost,
                **{k: metrics[k] for k in keep},
            )
        )
    return rows


def table(rows: list[dict]) -> str:
    header = ["recipe", "sampler", "steps", "images", "train min (wall)", "CPU min"]
    header += ["sgemm GFLOP/s", "accuracy", "noise rate", "FID", "sampling s"]
    return timing.markdown_table(
        header,
        [
            [
                r["recipe"],
                r["sampler"],
                r["steps"],
                f"{r['images']:,}",
                f"{r['train_minutes']:.1f}{' (resumed)' if r['resumed'] else ''}",
                f"{r['train_cpu_s'] / 60:.1f}",
                f"{r['sgemm_gflops_before']:.0f}-{r['sgemm_gflops_after']:.0f}",
                f"{r['accuracy']:.3f}",
                f"{r['noise_rate']:.3f}",
                f"{r['fid']:.2f}",
                f"{r['sampling_s']:.0f}",
            ]
            for r in rows
        ],
        numeric_from=2,
    )


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 5.2))
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))  # a colour each
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))  # a line style each
    styles = ("o-", "s--", "^:", "v-.", "D-")
    for line in dict.fromkeys((r["recipe"], r["sampler"]) for r in rows):
        mine = sorted(
            (r for r in rows if (r["recipe"], r["sampler"]) == line), key=lambda r: r["steps"]
        )
        minutes = [r["train_minutes"] for r in mine]
        color = f"C{recipes.index(line[0]) % 10}"
        style = styles[samplers.index(line[1]) % len(styles)]
        for ax, key in zip(axes, ("accuracy", "noise_rate", "fid"), strict=True):
            ax.plot(minutes, [r[key] for r in mine], style, color=color, label=" / ".join(line))
    for ax, title in zip(axes, ("label accuracy", "noise rate", "FID"), strict=True):
        ax.set(title=title, xlabel="training minutes (wall, this machine; log scale)")
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[2].set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    ncol = min(len(labels), 4)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize="small", frameon=False)
    fig.suptitle(f"control agent, preset {FLAGS.preset}: quality against training time")
    rows_of_legend = -(-len(labels) // ncol)
    fig.tight_layout(rect=(0, 0.045 * rows_of_legend + 0.02, 1, 1))
    fig.savefig(path, dpi=110)


def plot_guidance(rows: list[dict], path: str) -> None:
    """Accuracy, noise rate and FID against the guidance w, a line per recipe and budget (the
    em100 family: unguided w = 1 and its guided samplers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    em100 = [r for r in rows if r["sampler"] == "em100" or r["sampler"].startswith("em100_w")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    for i, line in enumerate(dict.fromkeys((r["recipe"], r["steps"]) for r in em100)):
        mine = sorted(
            (r for r in em100 if (r["recipe"], r["steps"]) == line), key=lambda r: r["guidance"]
        )
        for ax, key in zip(axes, ("accuracy", "noise_rate", "fid"), strict=True):
            ax.plot(
                [r.get("guidance", 1.0) for r in mine],
                [r[key] for r in mine],
                "o-",
                color=f"C{i % 10}",
                label=f"{line[0]}, {line[1]} steps",
            )
    for ax, title in zip(axes, ("label accuracy", "noise rate", "FID"), strict=True):
        ax.set(title=title, xlabel="guidance w (1: unguided)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"control agent, preset {FLAGS.preset}: classifier-free guidance, em100")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    del argv
    for recipe in FLAGS.recipes:  # every setting checked before anything is trained
        recipe_config(FLAGS.preset, recipe, 1)
    for sampler in FLAGS.samplers:
        if sampler not in SAMPLERS:
            raise app.UsageError(f"unknown sampler {sampler!r}; valid: {sorted(SAMPLERS)}")
    budgets = sorted(int(s) for s in FLAGS.steps)
    runtime.setup()
    clf = real = None
    if not FLAGS.report_only:
        clf_dir = FLAGS.classifier or os.path.join(FLAGS.workdir, "classifier")
        clf_cfg = classifier_config.get_config(FLAGS.classifier_preset)
        clf = classifier.train_classifier(clf_cfg, clf_dir)  # reuses a trained one
        mnist = digits.load_mnist(clf_cfg.data.mnist_dir, clf_cfg.data.tfds_data_dir)
        real = sample_sets.real_test_digits(clf, clf_dir, mnist)
    rows = []
    cells = [(recipe, steps) for recipe in FLAGS.recipes for steps in budgets]
    total_steps, done_steps, start = sum(s for _, s in cells), 0, time.perf_counter()
    for i, (recipe, steps) in enumerate(cells):
        rows.extend(run_cell(recipe, steps, clf, real))
        done_steps += steps
        if not rows or FLAGS.report_only:
            continue
        elapsed = time.perf_counter() - start
        logging.info(
            "cell %d/%d (%s, %d steps): accuracy %.3f, noise %.3f, FID %.2f; %.0f s elapsed, "
            "ETA %.0f min (by training steps)",
            i + 1,
            len(cells),
            recipe,
            steps,
            rows[-1]["accuracy"],
            rows[-1]["noise_rate"],
            rows[-1]["fid"],
            elapsed,
            elapsed / done_steps * (total_steps - done_steps) / 60,
        )
    stem = os.path.splitext(FLAGS.output)[0]
    os.makedirs(os.path.dirname(FLAGS.output) or ".", exist_ok=True)
    files.write_json(FLAGS.output, {"preset": FLAGS.preset, "rows": rows})
    files.write_text(stem + ".md", table(rows))
    plot(rows, stem + ".png")
    if any(r.get("guidance", 1.0) != 1 for r in rows):
        plot_guidance(rows, stem + "_guidance.png")
    print(table(rows))


if __name__ == "__main__":
    app.run(main)
