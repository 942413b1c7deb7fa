"""Outcomes, and the aggregate SQL that monitoring and back-testing are computed with, for both back ends.

- `outcomes`: one row per decision whose outcome the lender has reported
  (defaulted or not, when it was observed, who reported it).
- The window query counts, in one pass over a version's decisions in a window,
  the decisions by outcome, the probability and every feature per bin of the
  training distribution (cumulative counts for numeric bins: `x <= edge`).
- The ranking query groups outcomes by distinct probability and sums, with window
  functions, what ROC AUC (Mann-Whitney, ties counting half) and KS need: four
  numbers, whatever the number of decisions; and, from the same groups, the
  calibration per risk band.
- Quantiles are a query of their own: an ordered-set aggregate would keep
  PostgreSQL from running the window count in parallel.

The SQL is written once with `{p}` for the placeholder; bind parameters carry
every value, those read from a model's metadata included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.models.metadata import TrainingDistribution
from service.monitoring import BandOutcomes, Ranking, WindowCounts

OUTCOME_COLUMNS = "decision_id, defaulted, observed_at, recorded_at"
# Inserted only if the decision exists; nothing when an outcome is already recorded.
INSERT_OUTCOME = (
    "INSERT INTO outcomes (decision_id, defaulted, observed_at, recorded_at, recorded_by)"
    " SELECT id, {p}, {p}, {p}, {p} FROM decisions WHERE id = {p} ON CONFLICT (decision_id) DO NOTHING"
)
SELECT_OUTCOME = f"SELECT {OUTCOME_COLUMNS} FROM outcomes WHERE decision_id = {{p}}"
DECISION_TIME = "SELECT created_at FROM decisions WHERE id = {p}"

WINDOW = " FROM decisions WHERE model_version = {p} AND created_at >= {p} AND created_at < {p}"
PAIRED_WINDOW = (
    " FROM decisions d JOIN outcomes o ON o.decision_id = d.id"
    " WHERE d.model_version = {p} AND d.created_at >= {p} AND d.created_at < {p}"
)
# Decisions both models scored that have an outcome: back-testing champion and challenger on the same loans.
CHALLENGER_PAIRS = (
    " FROM decisions d JOIN challenger_decisions c ON c.decision_id = d.id JOIN outcomes o ON o.decision_id = d.id"
    " WHERE c.model_version = {p} AND d.model_version = {p} AND d.created_at >= {p} AND d.created_at < {p}"
)


@dataclass(frozen=True)
class WindowQuery:
    """The one-pass count over a window: SQL with {p}, the parameters of its select list, and how to read a row."""

    sql: str
    select_params: list[Any]
    # (feature name, number of bins, is numeric): the order the bin columns come in after the fixed ones.
    layout: list[tuple[str, int, bool]]


FIXED_COLUMNS = 5  # count, approve, decline, refer, mean probability


def window_query(distribution: TrainingDistribution | None) -> WindowQuery:
    """Counts by decision, the mean probability, and every bin of the training distribution (if any)."""
    columns = [
        "count(*)",
        *(f"sum(CASE WHEN decision = '{d}' THEN 1 ELSE 0 END)" for d in ("approve", "decline", "refer")),
        "avg(probability_of_default)",
    ]
    params: list[Any] = []
    layout: list[tuple[str, int, bool]] = []
    if distribution is not None:
        binned = [("probability_of_default", "probability", distribution.probability)]
        binned += [(name, name, bins) for name, bins in distribution.features.items()]
        for column, name, bins in binned:
            # Rows whose field is gone (erased for retention) count in no bin.
            columns.append(f"count({column})")
            if bins.edges is not None:
                for edge in bins.edges:
                    columns.append(f"sum(CASE WHEN {column} <= {{p}} THEN 1 ELSE 0 END)")
                    params.append(edge)
                layout.append((name, len(bins.edges) + 1, True))
            else:
                for value in bins.values or ():
                    columns.append(f"sum(CASE WHEN {column} = {{p}} THEN 1 ELSE 0 END)")
                    params.append(value)
                layout.append((name, len(bins.values or ()), False))
    return WindowQuery("SELECT " + ", ".join(columns) + WINDOW, params, layout)


def window_counts(
    row: Sequence[Any],
    query: WindowQuery,
    quantiles: tuple[dict[str, float | None], dict[str, float | None]],
    back_test: tuple[Ranking | None, list[BandOutcomes]],
) -> WindowCounts:
    """The window query's row, with the quantiles and the back-test read beside it, as monitoring takes them."""
    bins = read_bins(row, query.layout)
    probability_bins = bins.pop("probability", None)
    return WindowCounts(
        count=int(row[0]),
        approve=int(row[1] or 0),
        decline=int(row[2] or 0),
        refer=int(row[3] or 0),
        mean_probability=None if row[4] is None else float(row[4]),
        probability_quantiles=quantiles[0],
        score_quantiles=quantiles[1],
        probability_bins=probability_bins,
        feature_bins=bins if query.layout else None,
        ranking=back_test[0],
        bands=back_test[1],
    )


def read_bins(row: Sequence[Any], layout: list[tuple[str, int, bool]]) -> dict[str, list[int]]:
    """Per feature, the count in each bin, from the window query's columns after the fixed ones."""
    found: dict[str, list[int]] = {}
    at = FIXED_COLUMNS
    for name, size, numeric in layout:
        total = int(row[at] or 0)
        at += 1
        if numeric:
            # n cumulative counts (x <= edge) give n + 1 bins.
            cumulative = [int(v or 0) for v in row[at : at + size - 1]]
            at += size - 1
            found[name] = [b - a for a, b in zip([0, *cumulative], [*cumulative, total], strict=True)]
        else:
            found[name] = [int(v or 0) for v in row[at : at + size]]
            at += size
    return found


def ranking_query(probability: str, source: str, bands: bool = False) -> str:
    """What ROC AUC and KS need over `source` (FROM … WHERE …, defining d and o), from one pass.

    Outcomes are grouped by distinct probability; window functions then sum what
    the Mann-Whitney form of ROC AUC and KS need. The first row (band NULL) holds
    defaults, non-defaults, pairs below, pairs tied and KS; with `bands`, one row
    per risk band follows: its defaults, non-defaults and the sum of its
    probabilities (a band is a function of the probability, so the groups carry it).
    """
    band = "min(d.risk_category)" if bands else "NULL"
    by_band = (
        " UNION ALL SELECT band, sum(pos), sum(neg), NULL, NULL, NULL, sum(p * (pos + neg)) FROM g GROUP BY band"
        if bands
        else ""
    )
    return (
        f"WITH g AS (SELECT {probability} AS p, {band} AS band,"
        " sum(CASE WHEN o.defaulted THEN 1 ELSE 0 END) AS pos, sum(CASE WHEN o.defaulted THEN 0 ELSE 1 END) AS neg"
        f"{source} GROUP BY {probability}),"
        " c AS (SELECT pos, neg,"
        " coalesce(sum(neg) OVER (ORDER BY p ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS neg_below,"
        " sum(pos) OVER (ORDER BY p ROWS UNBOUNDED PRECEDING) AS cum_pos,"
        " sum(neg) OVER (ORDER BY p ROWS UNBOUNDED PRECEDING) AS cum_neg,"
        " sum(pos) OVER () AS all_pos, sum(neg) OVER () AS all_neg FROM g)"
        " SELECT NULL AS band, coalesce(sum(pos), 0), coalesce(sum(neg), 0), coalesce(sum(pos * neg_below), 0),"
        " coalesce(sum(pos * neg), 0),"
        " max(CASE WHEN all_pos > 0 AND all_neg > 0"
        " THEN abs(cum_pos * 1.0 / all_pos - cum_neg * 1.0 / all_neg) END), NULL FROM c" + by_band
    )


def ranking(rows: Sequence[Sequence[Any]]) -> tuple[Ranking, list[BandOutcomes]]:
    """The ranking query's rows: the back-test over all, and per band (when asked for)."""
    overall = next(r for r in rows if r[0] is None)
    _, defaults, non_defaults, below, tied, ks, _ = overall
    found = Ranking(
        defaults=int(defaults),
        non_defaults=int(non_defaults),
        pairs_below=float(below),
        pairs_tied=float(tied),
        ks=None if ks is None else float(ks),
    )
    bands = []
    for band, pos, neg, _, _, _, total_p in rows:
        if band is not None and pos + neg:
            count = int(pos) + int(neg)
            bands.append(BandOutcomes(str(band), count, float(total_p) / count, int(pos) / count))
    return found, bands


def roc_points_query(bucket: str) -> str:
    """Defaults and non-defaults per probability bucket (a thousandth wide), for drawing the ROC curve."""
    return (
        f"SELECT {bucket} AS b, sum(CASE WHEN o.defaulted THEN 1 ELSE 0 END),"
        f" sum(CASE WHEN o.defaulted THEN 0 ELSE 1 END){PAIRED_WINDOW} GROUP BY b ORDER BY b"
    )
