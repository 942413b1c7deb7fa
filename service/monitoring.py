"""What monitoring measures, as definitions: bins, population stability, back-testing figures.

The counting is done by the stores, with aggregate SQL over the system of record
(so every replica gives the same answer and no row is fetched into Python); this
module says how the training distribution is binned, how the counts become a
population stability index and its status, and how grouped outcome counts become
ROC AUC, Gini and KS. Training uses the same binning, so expected and actual
frequencies always describe the same bins.
"""

from __future__ import annotations

import bisect
import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from service.models.metadata import Bins, Metadata
from service.schemas import MonitoredFeature, Monitoring

# PSI = sum of (a - e) * ln(a / e); a bin with no rows counts as this share, so the sum stays finite.
EMPTY_BIN_SHARE = 0.0001
# stable < 0.10 <= watch < 0.25 <= act: the thresholds credit practice uses.
WATCH_FROM = 0.10
ACT_FROM = 0.25
DECILES = tuple(i / 10 for i in range(1, 10))
# The window when none is given: the last day.
DEFAULT_WINDOW = dt.timedelta(hours=24)


def decile_edges(values: Sequence[float]) -> list[float]:
    """The distinct deciles of the values: the upper edges of right-closed bins (ties collapse bins)."""
    ordered = sorted(values)
    edges: list[float] = []
    for q in DECILES:
        # The same definition as numpy's default (linear interpolation between order statistics).
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        edge = float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
        if not edges or edge > edges[-1]:
            edges.append(edge)
    return edges


def bin_index(bins: Bins, value: Any) -> int:
    """Which bin a value falls in: its category's position, or the first edge it does not exceed."""
    if bins.values is not None:
        return bins.values.index(value)
    assert bins.edges is not None
    return bisect.bisect_left(bins.edges, value)


def numeric_bins(values: Sequence[float]) -> Bins:
    edges = decile_edges(values)
    counts = [0] * (len(edges) + 1)
    for value in values:
        counts[bisect.bisect_left(edges, value)] += 1
    return Bins(frequencies=[c / len(values) for c in counts], edges=edges)


def categorical_bins(values: Sequence[Any], categories: Sequence[Any]) -> Bins:
    return Bins(frequencies=[values.count(c) / len(values) for c in categories], values=list(categories))


def psi(expected: Sequence[float], counts: Sequence[int]) -> float | None:
    """Population stability index of observed counts against expected shares; None without observations."""
    total = sum(counts)
    if total == 0:
        return None
    value = 0.0
    for e, n in zip(expected, counts, strict=True):
        a = max(n / total, EMPTY_BIN_SHARE)
        e = max(e, EMPTY_BIN_SHARE)
        value += (a - e) * math.log(a / e)
    return value


def status(value: float | None) -> Literal["stable", "watch", "act"] | None:
    if value is None:
        return None
    return "stable" if value < WATCH_FROM else "watch" if value < ACT_FROM else "act"


# -- back-testing ----------------------------------------------------------------------


@dataclass(frozen=True)
class Ranking:
    """Outcome counts summed over the distinct probabilities (as the stores compute them).

    `pairs_below` is the sum over probabilities of (defaults at p) * (non-defaults below p);
    `pairs_tied` the sum of (defaults at p) * (non-defaults at p); `ks` the largest gap
    between the cumulative shares of defaults and non-defaults.
    """

    defaults: int
    non_defaults: int
    pairs_below: float
    pairs_tied: float
    ks: float | None

    @property
    def roc_auc(self) -> float | None:
        """P(a default scores above a non-default), ties counting half: the Mann-Whitney form of ROC AUC."""
        pairs = self.defaults * self.non_defaults
        return None if pairs == 0 else (self.pairs_below + 0.5 * self.pairs_tied) / pairs


@dataclass(frozen=True)
class BandOutcomes:
    risk_category: str
    count: int
    predicted: float
    observed: float


@dataclass(frozen=True)
class WindowCounts:
    """Everything /monitoring reports, as the store counted it for one version and window."""

    count: int
    approve: int
    decline: int
    refer: int
    mean_probability: float | None
    probability_quantiles: dict[str, float | None]
    score_quantiles: dict[str, float | None]
    # Per bin of the training distribution (the probability's, then each feature's), when there is one.
    probability_bins: list[int] | None
    feature_bins: dict[str, list[int]] | None
    ranking: Ranking | None
    bands: list[BandOutcomes]


def report(metadata: Metadata, since: dt.datetime, until: dt.datetime, counts: WindowCounts) -> Monitoring:
    """The /monitoring answer from the counts: rates, PSI with statuses, and the back-test."""
    distribution = metadata.training_distribution
    probability_psi = (
        psi(distribution.probability.frequencies, counts.probability_bins)
        if distribution is not None and counts.probability_bins is not None
        else None
    )
    features = []
    for feature in metadata.features:
        observed = (counts.feature_bins or {}).get(feature.name)
        expected = distribution.features.get(feature.name) if distribution is not None else None
        value = psi(expected.frequencies, observed) if expected is not None and observed is not None else None
        features.append(MonitoredFeature(name=feature.name, psi=value, status=status(value)))

    def rate(n: int) -> float | None:
        return n / counts.count if counts.count else None

    outcomes = None
    ranking = counts.ranking
    if ranking is not None and ranking.defaults + ranking.non_defaults > 0:
        auc = ranking.roc_auc
        total = ranking.defaults + ranking.non_defaults
        order = {band.category: i for i, band in enumerate(metadata.risk_bands)}
        outcomes = {
            "count": total,
            "default_rate": ranking.defaults / total,
            "roc_auc": auc,
            "gini": None if auc is None else 2 * auc - 1,
            "ks": ranking.ks,
            "by_band": [
                {"risk_category": b.risk_category, "count": b.count, "predicted": b.predicted, "observed": b.observed}
                for b in sorted(counts.bands, key=lambda b: order.get(b.risk_category, len(order)))
            ],
        }
    return Monitoring(
        model_version=metadata.version,
        window={"since": since, "until": until},
        decisions={
            "count": counts.count,
            "approve": rate(counts.approve),
            "decline": rate(counts.decline),
            "refer": rate(counts.refer),
        },
        probability={
            "mean": counts.mean_probability,
            **counts.probability_quantiles,
            "psi": probability_psi,
            "status": status(probability_psi),
        },
        score=counts.score_quantiles,
        features=features,
        outcomes=outcomes,
        thresholds={"watch": WATCH_FROM, "act": ACT_FROM},
    )
