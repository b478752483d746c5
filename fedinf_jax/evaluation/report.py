"""The reproduction's report: Markdown tables of the metrics, the agents' agreement and the
wall times (``fedinf_jax.workflows.pipeline`` writes ``report.md`` with ``render``; ``evaluate.py``
prints ``metrics_table``)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from fedinf_jax.evaluation import agreement
from fedinf_jax.evaluation.metrics import PRECISION_RECALL_REAL


@dataclasses.dataclass
class ReportData:
    """Everything ``report.md`` shows, gathered by the reproduction
    (``fedinf_jax.workflows.pipeline``).

    ``config``: the reproduction's (``configs/reproduce.py``; its preset, samples per digit and
    seed are quoted); ``agents``: one dict per regime (``agents_row``); ``results``: Table 1's
    sets, each with its ``regime`` and ``procedure``; ``reference``: real images measured like a
    set; ``claims``: the claim sets; ``traffic``: per set of ``results``
    (``communication.of_sample_dir``); ``weights``: the agents' weights images, relative to the
    report; ``agreement``: Tables 3/4's rows (``pipeline.agreement_rows``); ``sweep``: the
    sweep's rows (``pipeline.sweep_summary``; titled by ``config.sweep.title``); ``timings``:
    the wall time of each stage."""

    config: Any
    agents: list[dict]
    classifier_accuracy: float
    results: dict
    reference: dict
    agreement: list[dict]
    timings: dict
    claims: dict = dataclasses.field(default_factory=dict)
    traffic: dict = dataclasses.field(default_factory=dict)
    weights: list[str] = dataclasses.field(default_factory=list)
    sweep: list[dict] | None = None
    num_test_images: int = 10_000


def render(data: ReportData) -> str:
    """``report.md``'s Markdown: the agents, Table 1 and the claim sets, the ratios to control
    beside the paper's, the communication a deployment would need, the grids and the agents'
    weights, Tables 3/4, the sweep and the wall times."""
    sections = (
        _header,
        _table_1,
        _claims,
        lambda d: ratio_table(d.results),
        _traffic,
        _figures,
        _agreement,
        _sweep,
        _timings,
    )
    return "\n".join(line for section in sections for line in section(data)) + "\n"


def _header(d: ReportData) -> list[str]:
    n = d.num_test_images
    return [
        f"# fedinf_jax reproduction, preset `{d.config.preset}`",
        "",
        f"Backend {jax.default_backend()}; evaluation classifier test accuracy "
        f"{d.classifier_accuracy:.4f}; {d.config.eval_per_class} samples per digit per set; FID "
        f"against the {n:,} MNIST test images in the classifier's penultimate features; IS over "
        "10 splits; noise rate = share with max softmax < 0.5; precision/recall with k = 3 "
        f"against {min(PRECISION_RECALL_REAL, n):,} test images.",
        "",
        "## The agents",
        "",
        *_shipped_note(d.config),
        *_agents_table(d.agents, d.timings),
    ]


def _table_1(d: ReportData) -> list[str]:
    return [
        "",
        "## Table 1: sample quality",
        "",
        *metrics_table(
            ["regime", "procedure"],
            [(["MNIST train", "real images"], d.reference)]
            + [([r["regime"], r["procedure"]], r) for r in d.results.values()],
        ),
        "",
        f"The first row is {d.config.eval_per_class} real training images per digit, measured "
        "like a sample set: a perfect generator's values at this sample size.",
    ]


def _claims(d: ReportData) -> list[str]:
    if not d.claims:
        return []
    n = d.config.claim_per_class
    return [
        "",
        f"## The claim sets: {n} samples per digit",
        "",
        "The control's `mean` and each federated regime's best corrected procedure in Table 1, "
        f"sampled again, {n} per digit on fresh draws (seed {d.config.seed + 1}): the set that "
        "chose the winner does not score it. One standard error of an accuracy p is "
        f"sqrt(p (1 - p) / {10 * n}).",
        "",
        *metrics_table(
            ["regime", "procedure"],
            [([r["regime"], r["procedure"]], r) for r in d.claims.values()],
        ),
    ]


def _traffic(d: ReportData) -> list[str]:
    if not d.traffic:
        return []
    return ["", "## Communication per generated sample", "", *_traffic_table(d.traffic)]


def _figures(d: ReportData) -> list[str]:
    lines = ["", "## Figure 2: samples (first 10 per digit)", ""]
    for r in d.results.values():
        rel = os.path.join(r["regime"], "samples", r["procedure"], "samples.png")
        lines.append(f"![{r['regime']} {r['procedure']}]({rel})")
    if d.weights:
        lines += ["", "## The agents' weights along the reverse process", ""]
        lines += [f"![{os.path.dirname(path)}]({path})" for path in d.weights]
    return lines


# What each aggregator's agreement table measures against, beside the uniform mean.
_AGREEMENT_NOTES = {
    "label_prior": "`superdiff_or`'s weights before any density evidence, at t = T",
    "superdiff_and": "the drift that keeps the agents' log-densities changing equally",
}


def _agreement(d: ReportData) -> list[str]:
    by_aggregator = {}
    for r in d.agreement:  # rows written before the aggregator field existed are the mean's
        by_aggregator.setdefault(r.get("aggregator", "mean"), []).append(r)
    lines = ["", "## Agreement at a glance", ""]
    lines += _agreement_summary(by_aggregator)
    lines += ["", "## Tables 3/4: agreement of the agents' scores (uniform mean)", ""]
    lines += _agreement_tables(by_aggregator.pop("mean", []))
    for name, group in by_aggregator.items():
        lines += [
            "",
            f"## Tables 3/4 under `{name}`: the agents' agreement with that aggregate",
            "",
        ]
        if name in _AGREEMENT_NOTES:
            lines += [f"({_AGREEMENT_NOTES[name]}.)", ""]
        lines += _agreement_tables(group)
    return lines


def _sweep(d: ReportData) -> list[str]:
    if not d.sweep:
        return []
    title = d.config.sweep.title[0].upper() + d.config.sweep.title[1:]
    return ["", f"## {title}", "", *sweep_table(d.sweep), "", "![sweep](sweep.png)"]


def _timings(d: ReportData) -> list[str]:
    lines = ["", "## Wall times (s)", "", "| stage | s |", "| --- | --- |"]
    return lines + [f"| {k} | {v} |" for k, v in d.timings.items()]


def agents_row(regime: str, run_config) -> dict:
    """What a regime trained, from its run config: agents, partition, U-Net, steps x batch."""
    m, t = run_config.model, run_config.train
    stem = f", {m.patch_size}x{m.patch_size} stem" if m.patch_size > 1 else ""
    return {
        "regime": regime,
        "agents": run_config.partition.num_agents,
        "partition": run_config.partition.name,
        "unet": f"{tuple(m.block_out_channels)}{stem}",
        "steps": f"{t.num_steps} x {t.batch_size}",
    }


def _shipped_note(config) -> list[str]:
    """With ``config.pretrained``: the agents and the classifier were not trained here."""
    folder = config.get("pretrained")
    if not folder:
        return []
    return [
        f"The agents and the classifier are the shipped runs in `{folder}` (each with its "
        "record, `<name>/pretrained.json`: the command that trained it); nothing was trained "
        "here.",
        "",
    ]


def _agents_table(agents: list[dict], timings: dict) -> list[str]:
    """What each regime trained, and its training wall time."""
    lines = [
        "| regime | agents | partition | U-Net channels | steps x batch per agent | training s |",
        "| --- | ---: | --- | --- | --- | ---: |",
    ]
    for a in agents:
        train_s = timings.get(f"train/{a['regime']}")
        lines.append(
            f"| {a['regime']} | {a['agents']} | {a['partition']} | {a['unet']} | {a['steps']} | "
            f"{_seconds(train_s)} |"
        )
    return lines


def metrics_table(key_columns: list[str], rows: list[tuple[list[str], dict]]) -> list[str]:
    """Table 1's markdown: each row's key cells, then its ``evaluate_sample_dir`` metrics; the
    accuracy and the noise rate with their binomial standard errors, sqrt(p (1 - p) / n), FID
    with its bootstrap standard error (``metrics.fid_standard_error``); the pixel measures
    (``metrics.fidelity``) where the row has them."""
    head = [*key_columns, "IS", "FID", "accuracy", "noise rate", "precision", "recall"]
    head += ["speckle", "black", "grey dist.", "score evals", "sampling s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for keys, r in rows:
        lines.append(
            f"| {' | '.join(keys)} | {r['inception_score']:.2f} +- "
            f"{r['inception_score_std']:.2f} | {r['fid']:.2f} +- {r['fid_se']:.2f} | "
            f"{_with_se(r['accuracy'], r['num_samples'])} | "
            f"{_with_se(r['noise_rate'], r['num_samples'])} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {' | '.join(_fidelity_cells(r))} | "
            f"{_count(r.get('score_evaluations'))} | {_seconds(r.get('sampling_wall_time_s'))} |"
        )
    return lines


def sweep_table(sweep: list[dict]) -> list[str]:
    """Per partition and procedure: mean +- standard error over the seeds."""
    head = ["partition", "procedure", "seeds", *QUALITY_HEAD, "sampling s"]
    rows = []
    for r in sweep:
        keys = [r["partition"], r["procedure"], str(r["seeds"])]
        rows.append([*keys, *quality_cells(r, with_se=True), f"{r['sampling_wall_time_s']:.0f}"])
    return [
        "Each partition's K agents trained on it, sampled under each procedure; mean +- standard "
        "error over the seeds (each seed draws the partition and the training anew).",
        "",
        *markdown_table(head, rows),
    ]


def _traffic_table(traffic: dict) -> list[str]:
    """What each set would move between the server and its agents, per sample
    (``fedinf_jax.evaluation.communication``), against one FedAvg round of the same agents."""
    rows = []
    for key, t in traffic.items():
        regime, procedure = key.split("/", 1)
        rows.append(
            [
                regime,
                procedure,
                str(t["agents_asked"]),
                f"{t['round_trips']:.0f}",
                f"{t['bytes'] / 1e6:.2f}",
                f"{t['fedavg_round_bytes'] / 1e6:.1f}",
                f"{t['samples_per_fedavg_round']:.2f}",
            ]
        )
    head = ["regime", "procedure", "agents asked", "round trips", "MB per sample"]
    head += ["FedAvg round MB", "samples per FedAvg round"]
    return [
        "Had the agents been on other machines: each score evaluation is a round trip, the "
        "server sending (x, t, y) to each agent it asks and receiving its score (fp32); the "
        "aggregate and any aggregator state stay on the server. A FedAvg round of the same agents "
        "moves every agent's weights down and up once.",
        "",
        *markdown_table(head, rows),
    ]


def _fidelity_cells(r: dict) -> list[str]:
    """Speckle, black share and grey-level distance, "-" for a row measured before them."""
    return [f"{r[k]:.3f}" if k in r else "-" for k in ("speckle", "black", "grey_distance")]


# The quality figures the sweep's and the studies' tables show alike: (header, metric, format).
QUALITY_COLUMNS = (
    ("accuracy", "accuracy", ".3f"),
    ("noise rate", "noise_rate", ".3f"),
    ("FID", "fid", ".2f"),
    ("speckle", "speckle", ".3f"),
)
QUALITY_HEAD = [head for head, _, _ in QUALITY_COLUMNS]


def quality_cells(r: dict, with_se: bool = False) -> list[str]:
    """A row's accuracy, noise rate, FID and speckle (``QUALITY_COLUMNS``), each followed by its
    standard error (the row's ``<metric>_se``) when ``with_se``."""
    return [
        f"{r[key]:{fmt}}" + (f" +- {r[key + '_se']:{fmt}}" if with_se else "")
        for _, key, fmt in QUALITY_COLUMNS
    ]


def _with_se(p: float, n: int) -> str:
    """A proportion of n samples with its binomial standard error."""
    return f"{p:.3f} +- {np.sqrt(p * (1 - p) / n):.3f}"


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines: the header, the rule, a line per row."""
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _count(value: float | None) -> str:
    """A count that may be a mean (evaluations per sample over batches of adaptive steps)."""
    return "-" if value is None else f"{value:g}"


# The paper's Table 1 (IS, FID), and its Figure 2 text: "over 50 % of the samples generated by
# the FederatedInference regimes were noise".
PAPER_TABLE1 = {"control": (5.9459, 1.6274), "homogeneous": (3.6795, 31.7551),
                "heterogeneous": (3.1651, 37.1922)}  # fmt: skip


def ratio_table(results: dict) -> list[str]:
    """Federated / control for each set, against the control set of the same procedure (the
    corrected aggregators against the control's ``mean``), beside the paper's ratios: raw IS and
    FID depend on the feature extractor, their ratios less so."""
    rows = []
    for r in results.values():
        ref = "paper" if r["procedure"] == "paper" else "mean"
        control = results.get(f"control/{ref}")
        if r["regime"] == "control" or control is None:
            continue
        paper_is, paper_fid = PAPER_TABLE1[r["regime"]]
        rows.append(
            f"| {r['regime']} | {r['procedure']} | "
            f"{r['inception_score'] / control['inception_score']:.2f} | "
            f"{r['fid'] / control['fid']:.1f} | "
            f"{r['accuracy'] - control['accuracy']:+.3f} | "
            f"{r['noise_rate'] - control['noise_rate']:+.3f} | "
            f"{paper_is / PAPER_TABLE1['control'][0]:.2f} | "
            f"{paper_fid / PAPER_TABLE1['control'][1]:.1f} |"
        )
    if not rows:
        return []
    return [
        "",
        "Relative to the control agent sampled the same way (`paper` to `paper`, the corrected "
        "aggregators to `mean`); the paper's Table 1 ratios beside them (its IS/FID used other "
        "features, so only ratios compare; it reports over 50% noise for both federated regimes):",
        "",
        "| regime | procedure | IS / control | FID / control | accuracy - control | "
        "noise rate - control | paper IS / control | paper FID / control |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]


def _agreement_summary(by_aggregator: dict[str, list[dict]]) -> list[str]:
    """Tables 3/4 averaged over the digits: one row per (aggregate, input, regime), one column
    per t, cells "magnitude / cosine"."""
    times = sorted({r["t"] for rows in by_aggregator.values() for r in rows}, reverse=True)
    out = [
        "Mean over the 10 digits of Tables 3/4 (and their versions under the other aggregates): "
        "magnitude of the aggregate / mean cosine of each agent's score to it.",
        "",
        "| aggregate | input | regime | " + " | ".join(f"t = {t:g}" for t in times) + " |",
        "| --- | --- | --- |" + " --- |" * len(times),
    ]
    for name in sorted(by_aggregator, key=lambda n: n != "mean"):  # the paper's mean first
        rows = by_aggregator[name]
        for kind in agreement.INPUTS:
            for regime in dict.fromkeys(r["regime"] for r in rows):
                cells = []
                for t in times:
                    key = (t, kind, regime)
                    sel = [r for r in rows if (r["t"], r["input"], r["regime"]) == key]
                    magnitude = np.mean([r["magnitude"] for r in sel])
                    cells.append(f"{magnitude:.1f} / {np.mean([r['cosine'] for r in sel]):.2f}")
                out.append(f"| {name} | {kind} | {regime} | " + " | ".join(cells) + " |")
    return out


def _agreement_tables(rows: list[dict]) -> list[str]:
    """One table per t: rows (input, regime), columns digits, cells "magnitude / cosine"."""
    out = []
    for t in sorted({r["t"] for r in rows}, reverse=True):
        labels = sorted({r["label"] for r in rows})
        out += [
            f"t = {t:g}: magnitude +- std / cosine +- std",
            "",
            "| input | regime | " + " | ".join(str(c) for c in labels) + " |",
            "| --- | --- | " + " | ".join("---" for _ in labels) + " |",
        ]
        for kind in agreement.INPUTS:
            for regime in dict.fromkeys(r["regime"] for r in rows):
                cells = {
                    r["label"]: f"{r['magnitude']:.2f} +- {r['magnitude_std']:.2f} / "
                    f"{r['cosine']:.2f} +- {r['cosine_std']:.2f}"
                    for r in rows
                    if r["t"] == t and r["input"] == kind and r["regime"] == regime
                }
                out.append(f"| {kind} | {regime} | " + " | ".join(cells[c] for c in labels) + " |")
        out.append("")
    return out
