"""`pipe report RUN_DIR`: figures and one self-contained HTML page for a run.

Reads the training metrics of every model folder under ``RUN/teachers/*`` and ``RUN/students/*``
(``metrics.jsonl``: lines with ``loss`` per logged step, lines with ``dev_loss`` per epoch) and, when
present, the evaluation results ``RUN/eval/results.json`` (from `pipe evaluate`). Writes::

    RUN/eval/figures/training_curves.png   training loss vs step; dev loss per epoch
    RUN/eval/figures/blimp_phenomena.png   BLiMP accuracy per phenomenon, models side by side
    RUN/eval/figures/reliability.png       reliability diagram of each model (held-out split)
    RUN/eval/report.html                   tables + the figures inlined (base64 PNG): one file

A figure whose data is missing (no results yet, no BLiMP, ...) is left out and the page says so.
matplotlib draws the figures (Agg backend, no display needed).
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logitcache.pipeline.errors import DataError, StageError
from logitcache.pipeline.evaluation.compare import headline_lines
from logitcache.pipeline.evaluation.evaluate import model_name, read_results
from logitcache.pipeline.preflight import check_writable
from logitcache.pipeline.rundir import RunLayout, atomic_write_text

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainingCurves:
    name: str
    steps: list[int]  # logged optimizer steps
    losses: list[float]  # training loss at those steps
    dev_epochs: list[int]  # 1-based epoch of each dev evaluation
    dev_steps: list[int]
    dev_losses: list[float]


def read_training_curves(model_dir: Path) -> TrainingCurves:
    """The curves of one model folder from its ``metrics.jsonl``."""
    path = model_dir / METRICS_FILE
    steps, losses, dev_epochs, dev_steps, dev_losses = [], [], [], [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if "dev_loss" in record:
                dev_losses.append(float(record["dev_loss"]))
                dev_steps.append(int(record["step"]))
                dev_epochs.append(int(record.get("epoch", len(dev_epochs))) + 1)
            elif "loss" in record:
                losses.append(float(record["loss"]))
                steps.append(int(record["step"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise DataError(
                f"{path}:{lineno}: expected a JSON object with step and loss or dev_loss. Got {line[:80]!r}."
            ) from None
    return TrainingCurves(model_name(model_dir), steps, losses, dev_epochs, dev_steps, dev_losses)


def find_training_curves(run_dir: Path) -> list[TrainingCurves]:
    curves = []
    layout = RunLayout(run_dir)
    for root in (layout.teachers, layout.students):
        if root.is_dir():
            for model_dir in sorted(p for p in root.iterdir() if (p / METRICS_FILE).is_file()):
                curves.append(read_training_curves(model_dir))
    return curves


# ----------------------------------------------------------------------------------------------
# Figures


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise StageError(
            "Expected matplotlib for `pipe report`. Got none installed: pip install 'matplotlib>=3.8'."
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names: list[str]) -> dict[str, Any]:
    plt = _pyplot()
    cycle = plt.get_cmap("tab10").colors
    return {name: cycle[i % len(cycle)] for i, name in enumerate(names)}


def plot_training_curves(curves: list[TrainingCurves], colors: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, (ax_steps, ax_epochs) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for c in curves:
        if c.steps:
            ax_steps.plot(c.steps, c.losses, color=colors[c.name], lw=1.2, label=f"{c.name} (train)")
        if c.dev_steps:
            ax_steps.plot(
                c.dev_steps,
                c.dev_losses,
                "o--",
                color=colors[c.name],
                ms=6,
                lw=1,
                mfc="white",
                label=f"{c.name} (dev)",
            )
            ax_epochs.plot(c.dev_epochs, c.dev_losses, "o-", color=colors[c.name], label=c.name)
    ax_steps.set(
        xlabel="optimizer step",
        ylabel="loss (nats / token)",
        # A distilled student's training loss is its objective (CE and KL mixed), not comparable
        # with a CE; the dev loss is next-token CE for every model.
        title="Training objective (line; students: CE/KL mix) and dev CE (circles)",
    )
    ax_epochs.set(xlabel="epoch", ylabel="dev loss (nats / token)", title="Dev loss per epoch")
    epochs = sorted({e for c in curves for e in c.dev_epochs})
    if epochs:
        ax_epochs.set_xticks(epochs)
    for ax in (ax_steps, ax_epochs):
        ax.grid(alpha=0.3)
    ax_steps.legend(fontsize=8, ncol=2)
    ax_epochs.legend(fontsize=8)
    return _save(fig, path)


def plot_blimp_phenomena(models: list[dict[str, Any]], colors: dict[str, Any], path: Path) -> Path:
    """Horizontal grouped bars: overall then each phenomenon, one bar per model, 50 % chance line."""
    plt = _pyplot()
    phenomena = sorted({p for m in models for p in m["blimp"]["phenomena"]})
    rows = ["overall", *phenomena]
    height = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(9, 0.9 + 0.22 * len(rows) * max(2, len(models))))
    for i, m in enumerate(models):
        values = [m["blimp"]["overall"], *(m["blimp"]["phenomena"].get(p, math.nan) for p in rows[1:])]
        ys = [r + (i - (len(models) - 1) / 2) * height for r in range(len(rows))]
        bars = ax.barh(
            ys, [100 * v for v in values], height=height * 0.92, color=colors[m["name"]], label=m["name"]
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.axvline(50, color="grey", ls="--", lw=1, label="chance (50 %)", zorder=0)
    ax.set_yticks(range(len(rows)), [r.replace("_", " ") for r in rows])
    ax.get_yticklabels()[0].set_fontweight("bold")
    ax.invert_yaxis()
    ax.set(
        xlim=(0, 105),
        xlabel="accuracy (%)",
        title="BLiMP accuracy per phenomenon (overall = mean over paradigms)",
    )
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_reliability(models: list[dict[str, Any]], colors: dict[str, Any], path: Path) -> Path:
    """Per model: accuracy per confidence bin against the diagonal, and the share of positions per bin."""
    plt = _pyplot()
    n = len(models)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = plt.figure(figsize=(4.2 * cols, 5.2 * rows))
    # One cell per model (room between rows for the titles), split into the diagram and its counts.
    outer = fig.add_gridspec(rows, cols, hspace=0.32, wspace=0.3)
    for i, m in enumerate(models):
        r, c = divmod(i, cols)
        rel = m["held_out"]["reliability"]
        edges = rel["edges"]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        width = edges[1] - edges[0]
        acc = [math.nan if v is None else v for v in rel["accuracy"]]
        conf = [math.nan if v is None else v for v in rel["confidence"]]
        cell = outer[r, c].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.08)
        ax = fig.add_subplot(cell[0])
        ax.bar(centers, acc, width=width * 0.95, color=colors[m["name"]], alpha=0.85, label="accuracy")
        gap_low = [min(a, c) for a, c in zip(acc, conf, strict=True)]
        gap = [abs(a - c) for a, c in zip(acc, conf, strict=True)]
        ax.bar(
            centers,
            gap,
            bottom=gap_low,
            width=width * 0.95,
            color="none",
            edgecolor="crimson",
            hatch="///",
            lw=0.8,
            label="gap to mean confidence",
        )
        ax.plot(conf, acc, "k.", ms=4, label="(mean confidence, accuracy)")
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", xticklabels=[])
        ax.set_title(
            f"{m['name']}\nECE {m['held_out']['ece']:.4f} ({m['held_out']['split']}, "
            f"{rel['total']:,} tokens)",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="upper left")
        share = [k / max(rel["total"], 1) for k in rel["count"]]
        ax_count = fig.add_subplot(cell[1])
        ax_count.bar(centers, share, width=width * 0.95, color="grey")
        ax_count.set_yscale("log")  # most positions sit in the low bins; the others must stay visible
        ax_count.set(xlim=(0, 1), xlabel="confidence (max probability)", ylabel="share of tokens")
        ax_count.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------
# The page


def build_report(run_dir: str | Path, *, results_path: str | Path | None = None) -> Path:
    """Draw the figures of a run and write ``RUN/eval/report.html``; return its path."""
    layout = RunLayout(Path(run_dir))
    if not layout.root.is_dir():
        raise StageError(
            f"Expected a run directory at {layout.root}. Got nothing there: pass the run.dir of a `pipe run`."
        )
    curves = find_training_curves(layout.root)
    results_file = Path(results_path) if results_path is not None else layout.eval_results
    results = read_results(results_file) if results_file.is_file() else None
    if results_path is not None and results is None:
        raise DataError(
            f"Expected evaluation results at {results_file}. Got nothing there: pass the results "
            "JSON that `pipe evaluate` wrote."
        )
    evaluated = results["models"] if results else []
    if not curves and not evaluated:
        raise StageError(
            f"Expected trained models (RUN/teachers/*, RUN/students/* with {METRICS_FILE}) or "
            f"{layout.eval_results} in {layout.root}. Found neither: run `pipe run CONFIG` first."
        )
    check_writable(layout.eval, "the report")  # before any figure is drawn
    names = list(dict.fromkeys([c.name for c in curves] + [m["name"] for m in evaluated]))
    colors = _colors(names)
    figures_dir = layout.figures
    figures: list[tuple[str, Path | None, str]] = []  # (title, png or None, note)

    trained = [c for c in curves if c.steps or c.dev_steps]
    figures.append(
        ("Training curves", plot_training_curves(trained, colors, figures_dir / "training_curves.png"), "")
        if trained
        else ("Training curves", None, "No training metrics found under teachers/ or students/.")
    )
    with_blimp = [m for m in evaluated if m.get("blimp")]
    figures.append(
        (
            "BLiMP per phenomenon",
            plot_blimp_phenomena(with_blimp, colors, figures_dir / "blimp_phenomena.png"),
            "",
        )
        if with_blimp
        else ("BLiMP per phenomenon", None, "No BLiMP results (run `pipe evaluate ... --blimp DIR`).")
    )
    with_held_out = [m for m in evaluated if m.get("held_out")]
    figures.append(
        ("Reliability diagrams", plot_reliability(with_held_out, colors, figures_dir / "reliability.png"), "")
        if with_held_out
        else ("Reliability diagrams", None, "No held-out results (run `pipe evaluate ... --data RUN/data`).")
    )
    page = _html(layout.root, results, results_file, curves, figures)
    out = layout.report
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return out


def _fmt(value: Any, spec: str) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and not math.isfinite(value))
        else format(value, spec)
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(
    run_dir: Path,
    results: dict[str, Any] | None,
    results_file: Path,
    curves: list[TrainingCurves],
    figures: list[tuple[str, Path | None, str]],
) -> str:
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>logitcache report: {html.escape(run_dir.name)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%;border:1px solid #eee}.note{color:#777;font-style:italic}code{background:#f6f6f6}</style>",
        "</head><body>",
        f"<h1>logitcache report</h1><p>Run <code>{html.escape(str(run_dir.resolve()))}</code>, generated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.</p>",
    ]
    if results:
        models = results["models"]
        fields = sorted({f for m in models if m.get("blimp") for f in m["blimp"]["fields"]})
        settings = results.get("settings", {})
        split = settings.get("split", "")
        header = ["model", "parameters", f"{split} perplexity", f"{split} loss", "ECE", "BLiMP", *fields]
        entries = [
            *((m["name"], m) for m in models),
            *((f"{t['name']} (untrained)", t) for t in results.get("random_twins", [])),
            *((f"{r['name']} (reference)", r) for r in results.get("references", [])),
        ]
        rows = []
        for label, entry in entries:
            h, b = entry.get("held_out") or {}, entry.get("blimp") or {}
            rows.append(
                [
                    label,
                    f"{entry['parameters']:,}" if "parameters" in entry else "–",
                    _fmt(h.get("perplexity"), ".2f"),
                    _fmt(h.get("loss"), ".4f"),
                    _fmt(h.get("ece"), ".4f"),
                    _fmt(100 * b["overall"], ".1f") if b else "–",
                    *(_fmt(100 * b["fields"][f], ".1f") if b and f in b["fields"] else "–" for f in fields),
                ]
            )
        headline = headline_lines(results)
        if headline:
            items = "".join(f"<li>{html.escape(line)}</li>" for line in headline)
            parts.append(f"<h2>Distillation at a glance</h2><ul>{items}</ul>")
        parts.append("<h2>Summary</h2>" + _table(header, rows))
        if results.get("references"):
            described = "; ".join(f"{r['name']}: {r['description']}" for r in results["references"])
            parts.append(f"<p class='note'>References: {html.escape(described)}.</p>")
        parts.append(
            f"<p class='note'>From <code>{html.escape(str(results_file))}</code>: held-out data "
            f"<code>{html.escape(str(settings.get('data')))}</code> ({html.escape(split)} split), BLiMP "
            f"<code>{html.escape(str(settings.get('blimp')))}</code>. BLiMP in % (a pair is right when the good "
            "sentence's summed log-probability is strictly higher; overall and per field = unweighted mean over "
            f"paradigms). ECE over {settings.get('ece_bins', 15)} equal-width confidence bins.</p>"
        )
    else:
        parts.append(
            f"<p class='note'>No evaluation results at {html.escape(str(results_file))}: run "
            "<code>pipe evaluate</code> for perplexity, BLiMP and calibration.</p>"
        )
    if curves:
        rows = [
            [
                c.name,
                str(c.steps[-1] if c.steps else 0),
                _fmt(c.losses[-1] if c.losses else None, ".4f"),
                _fmt(c.dev_losses[-1] if c.dev_losses else None, ".4f"),
            ]
            for c in curves
        ]
        parts.append(
            "<h2>Training</h2>" + _table(["model", "steps", "last train loss", "last dev loss"], rows)
        )
    for title, png, note in figures:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if png is None:
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
        else:
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>")
    if results and any(m.get("blimp") for m in results["models"]):
        models = [m for m in results["models"] if m.get("blimp")]
        paradigms = sorted({u for m in models for u in m["blimp"]["paradigms"]})
        rows = []
        for uid in paradigms:
            first = next(m["blimp"]["paradigms"][uid] for m in models if uid in m["blimp"]["paradigms"])
            rows.append(
                [
                    uid,
                    first["field"],
                    first["linguistics_term"],
                    *(
                        _fmt(100 * m["blimp"]["paradigms"][uid]["accuracy"], ".1f")
                        if uid in m["blimp"]["paradigms"]
                        else "–"
                        for m in models
                    ),
                ]
            )
        parts.append(
            "<details><summary>BLiMP per paradigm (%)</summary>"
            + _table(["paradigm", "field", "phenomenon", *(m["name"] for m in models)], rows)
            + "</details>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)
