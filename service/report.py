"""`make report`: a self-contained HTML model report from the configured database.

    python -m service.report [--since T] [--until T] [--model-version V] [--output var/model-report.html]
                             [--images DIR]

Reads what GET /monitoring reads (the same aggregate queries, so the report and
the API agree), plus the ROC curve by thousandths of probability and the
challenger comparison, and draws them with matplotlib: the ROC curve, calibration
by risk band, the probability's distribution in the window against training,
PSI per feature, and champion against challenger. The images are embedded, so
the file can be mailed or archived as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import html
import io
import logging
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files, never a screen

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from service import logs, monitoring, storage
from service.errors import StoreUnavailable
from service.models.metadata import Metadata, ModelError
from service.models.registry import Registry
from service.schemas import Comparison, Monitoring
from service.settings import PROJECT_ROOT, ConfigError, Settings

logger = logging.getLogger("service.report")

DEFAULT_OUTPUT = PROJECT_ROOT / "var" / "model-report.html"
COLORS = {"stable": "#2e7d32", "watch": "#f9a825", "act": "#c62828", None: "#9e9e9e"}
CHAMPION, CHALLENGER, TRAINING = "#1565c0", "#ef6c00", "#9e9e9e"


class ReportError(Exception):
    """The report cannot be made (no such version, nothing assigned); the message says why."""


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def roc_figure(points: list[tuple[int, int, int]], auc: float | None) -> Figure:
    """ROC from defaults and non-defaults per thousandth of probability, highest probability first."""
    defaults = sum(p for _, p, _ in points)
    others = sum(n for _, _, n in points)
    tpr, fpr = [0.0], [0.0]
    for _, pos, neg in sorted(points, reverse=True):
        tpr.append(tpr[-1] + pos / defaults)
        fpr.append(fpr[-1] + neg / others)
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.plot(fpr, tpr, color=CHAMPION, label=f"model (AUC {auc:.3f})" if auc is not None else "model")
    axes.plot([0, 1], [0, 1], linestyle="--", color=TRAINING, label="chance")
    axes.set(xlabel="false positive rate (good borrowers declined)", ylabel="true positive rate (defaults caught)")
    axes.set(title="ROC curve", xlim=(0, 1), ylim=(0, 1))
    axes.legend(loc="lower right")
    return figure


def calibration_figure(by_band: list[dict[str, Any]]) -> Figure:
    figure, axes = plt.subplots(figsize=(7, 4))
    names = [b["risk_category"] for b in by_band]
    places = range(len(names))
    axes.bar([i - 0.2 for i in places], [b["predicted"] for b in by_band], 0.4, color=CHAMPION, label="predicted")
    axes.bar([i + 0.2 for i in places], [b["observed"] for b in by_band], 0.4, color=CHALLENGER, label="observed")
    axes.set_xticks(list(places), [f"{n}\n({b['count']:,})" for n, b in zip(names, by_band, strict=True)])
    axes.set(ylabel="default rate", title="Calibration by risk band (decisions with an outcome)")
    axes.legend()
    return figure


def distribution_figure(metadata: Metadata, bins: list[int] | None, report: Monitoring) -> Figure:
    """The probability of default per training decile: its share in training (10 % each) and in the window."""
    figure, axes = plt.subplots(figsize=(7, 4))
    distribution = metadata.training_distribution
    if distribution is None or bins is None or not sum(bins):
        axes.text(0.5, 0.5, "no training distribution, or no decisions in the window", ha="center", va="center")
        axes.set_axis_off()
        return figure
    edges = distribution.probability.edges or []
    labels = [f"≤{e:.2f}" for e in edges] + [f">{edges[-1]:.2f}"]
    total = sum(bins)
    places = range(len(labels))
    axes.bar([i - 0.2 for i in places], distribution.probability.frequencies, 0.4, color=TRAINING, label="training")
    axes.bar([i + 0.2 for i in places], [n / total for n in bins], 0.4, color=CHAMPION, label="window")
    axes.set_xticks(list(places), labels, rotation=45)
    psi = report.probability.get("psi")
    title = f"Probability of default by training decile: PSI {psi:.3f} ({report.probability.get('status')})"
    axes.set(xlabel="probability of default (bin upper edge)", ylabel="share of decisions", title=title)
    axes.legend()
    return figure


def psi_figure(report: Monitoring) -> Figure:
    features = [f for f in report.features if f.psi is not None]
    figure, axes = plt.subplots(figsize=(7, 0.35 * max(len(features), 4) + 1))
    if not features:
        axes.text(0.5, 0.5, "no PSI: no training distribution, or no decisions", ha="center", va="center")
        axes.set_axis_off()
        return figure
    names = [f.name for f in features]
    values = [f.psi or 0.0 for f in features]
    bars = axes.barh(names, values, color=[COLORS[f.status] for f in features])
    axes.bar_label(bars, [f"{v:.3f}" for v in values], padding=3, fontsize=8)
    axes.set_xlim(0, max(max(values), monitoring.ACT_FROM) * 1.15)
    axes.axvline(monitoring.WATCH_FROM, color=COLORS["watch"], linestyle="--", label=f"watch ≥ {monitoring.WATCH_FROM}")
    axes.axvline(monitoring.ACT_FROM, color=COLORS["act"], linestyle="--", label=f"act ≥ {monitoring.ACT_FROM}")
    axes.invert_yaxis()
    axes.set(xlabel="population stability index", title="Characteristic stability per feature")
    axes.legend(loc="lower right")
    return figure


def comparison_figure(comparison: Comparison) -> Figure:
    figure, (rates, flips) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained", width_ratios=(2, 3))
    shown = {"champion": comparison.champion, "challenger": comparison.challenger}
    values = [comparison.approval_rate.get(role) or 0.0 for role in shown]
    bars = rates.bar([f"{role}\n{version}" for role, version in shown.items()], values, color=[CHAMPION, CHALLENGER])
    rates.bar_label(bars, [f"{v:.1%}" for v in values], padding=3)
    rates.set_ylim(0, max(values) * 1.2 or 1)
    rates.set(ylabel="approval rate", title=f"Approval rate, {comparison.count:,} decisions scored by both")
    names = [name.replace("_to_", " → ") for name in comparison.flips]
    counts = list(comparison.flips.values())
    bars = flips.barh(names, counts, color=CHALLENGER)
    flips.bar_label(bars, [f"{n:,}" for n in counts], padding=3)
    flips.set_xlim(0, max(max(counts), 1) * 1.15)
    flips.invert_yaxis()
    flips.set(xlabel="decisions", title="Decision flips (champion's decision → challenger's)")
    return figure


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_text(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "n/a" if value is None else str(value)


def _image(figure: Figure, alt: str, images: Path | None) -> str:
    """The figure embedded as a PNG data URI; also written to `images`/<alt>.png when asked."""
    png = _png(figure)
    if images is not None:
        images.mkdir(parents=True, exist_ok=True)
        (images / (alt.replace(" ", "-") + ".png")).write_bytes(png)
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #212121; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5rem 0; } th, td { padding: 0.2rem 0.8rem; border: 1px solid #ddd; }
th { text-align: left; background: #f5f5f5; } img { max-width: 100%; } .note { color: #616161; }
"""


async def gather(
    settings: Settings, since: dt.datetime, until: dt.datetime, version: str | None, images: Path | None = None
) -> str:
    """Read the figures from the configured database and render the report's HTML."""
    store = await storage.open_store(settings, "credit-scoring-report")
    try:
        assignment = await store.read_assignment()
        version = version or (assignment.champion if assignment is not None else None)
        if version is None:
            raise ReportError("No model is assigned in this database yet; name one with --model-version.")
        entry = await asyncio.to_thread(Registry(settings.model_dir).get, version)
        if entry.metadata is None:
            raise ReportError(f"Model version {version} cannot be read: {entry.error}")
        metadata = entry.metadata
        counts = await store.monitoring_counts(version, since, until, metadata.training_distribution)
        report = monitoring.report(metadata, since, until, counts)
        points = await store.roc_points(version, since, until)
        comparison = None
        if assignment is not None and assignment.challenger is not None and version == assignment.champion:
            comparison = await store.compare(version, assignment.challenger.version, since, until)
    finally:
        await store.close()
    return render(metadata, report, counts, points, comparison, images)


def render(
    metadata: Metadata,
    report: Monitoring,
    counts: monitoring.WindowCounts,
    points: list[tuple[int, int, int]],
    comparison: Comparison | None,
    images: Path | None = None,
) -> str:
    window = f"{report.window['since']:%Y-%m-%d %H:%M} to {report.window['until']:%Y-%m-%d %H:%M} UTC"
    parts = [
        f"<h1>Model report: {html.escape(metadata.version)}</h1>",
        f"<p class='note'>{html.escape(window)}; written {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC from the "
        "system of record. PSI: stable &lt; 0.10 ≤ watch &lt; 0.25 ≤ act.</p>",
        "<h2>Decisions</h2>",
        _table(
            [
                ("decisions", report.decisions["count"]),
                ("approve", report.decisions["approve"]),
                ("decline", report.decisions["decline"]),
                ("refer", report.decisions["refer"]),
                ("mean probability of default", report.probability["mean"]),
                ("probability p50 / p90", f"{_text(report.probability['p50'])} / {_text(report.probability['p90'])}"),
                ("score p10 / p50 / p90", " / ".join(_text(report.score[k]) for k in ("p10", "p50", "p90"))),
                ("PSI of the probability", f"{_text(report.probability['psi'])} ({report.probability['status']})"),
            ]
        ),
        "<h2>Population stability</h2>",
        _image(distribution_figure(metadata, counts.probability_bins, report), "probability by decile", images),
        _image(psi_figure(report), "PSI per feature", images),
        "<h2>Back-testing</h2>",
    ]
    outcomes = report.outcomes
    if outcomes is None:
        parts.append("<p>No outcome is recorded yet for decisions in this window.</p>")
    else:
        parts += [
            _table(
                [
                    ("decisions with an outcome", outcomes["count"]),
                    ("default rate", outcomes["default_rate"]),
                    (
                        "ROC AUC (held-out figure at training)",
                        f"{_text(outcomes['roc_auc'])} ({metadata.metrics.roc_auc:.4f})",
                    ),
                    ("Gini", outcomes["gini"]),
                    ("KS", outcomes["ks"]),
                ]
            ),
            _image(roc_figure(points, outcomes["roc_auc"]), "ROC curve", images),
            _image(calibration_figure(outcomes["by_band"]), "calibration by band", images),
        ]
    parts.append("<h2>Challenger</h2>")
    if comparison is None or comparison.count == 0:
        parts.append("<p>No challenger scored decisions of this version in this window.</p>")
    else:
        delta = comparison.abs_delta_p
        parts += [
            _table(
                [
                    ("challenger", comparison.challenger),
                    ("decisions scored by both", comparison.count),
                    ("mean |Δp| / p95", f"{_text(delta['mean'])} / {_text(delta['p95'])}"),
                    ("score correlation", comparison.score_correlation),
                ]
            ),
            _image(comparison_figure(comparison), "champion against challenger", images),
        ]
    body = "\n".join(parts)
    title = f"Model report {html.escape(metadata.version)}"
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )


def _time(raw: str) -> dt.datetime:
    value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--since", type=_time, help="ISO 8601 (default: until - 24 h)")
    parser.add_argument("--until", type=_time, help="ISO 8601 (default: now)")
    parser.add_argument("--model-version", help="default: the champion")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--images", type=Path, help="also write each plot as a PNG file into this folder")
    args = parser.parse_args(argv)
    logs.configure()
    until = args.until or dt.datetime.now(dt.UTC)
    since = args.since or until - monitoring.DEFAULT_WINDOW
    try:
        settings = Settings.from_env()
        page = asyncio.run(gather(settings, since, until, args.model_version, args.images))
    except (ConfigError, StoreUnavailable, ModelError, ReportError) as exc:
        logger.error("No report: %s", exc)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page)
    logger.info("Wrote %s (%d KiB)", args.output, len(page) // 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
