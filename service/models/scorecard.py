"""The folded logistic scorer: a weight per category, a weight and centre per numeric, a bias.

Training folds the fitted one-hot encoder, scaler and logistic regression into
these weights and writes them to the version's `scorecard.json`; serving reads
them back with msgspec alone. Calling the pipeline per request would cost ~5 ms
of pandas/sklearn overhead; this costs a few microseconds, and a worker that
serves it needs neither numpy nor scikit-learn.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import msgspec

from service.reasons import GIVEN, reason
from service.schemas import APPLICANT_FIELDS, Applicant, Reason, allowed_values

SCORECARD_FORMAT = 1
MAX_REASONS = 4
CATEGORICAL_FIELDS: tuple[str, ...] = tuple(f for f in APPLICANT_FIELDS if allowed_values(f) is not None)
NUMERIC_FIELDS: tuple[str, ...] = tuple(f for f in APPLICANT_FIELDS if allowed_values(f) is None)


class NumericWeight(msgspec.Struct):
    weight: float
    centre: float


class ScorecardFile(msgspec.Struct):
    """`scorecard.json`: categories as [value, weight] pairs (JSON keys cannot be booleans)."""

    format: int
    bias: float
    categorical: dict[str, list[tuple[Any, float]]]
    numeric: dict[str, NumericWeight]


def sigmoid(z: float) -> float:
    # Two branches so that exp() never overflows for extreme log-odds.
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class Scorer:
    """Log-odds of default as a sum of per-field contributions.

    Each contribution is measured against the average training applicant, the
    method Regulation B's official commentary describes for picking the
    principal reasons of an adverse action: for a logistic model it is
    `weight · (value - training average)` on the log-odds scale.
    """

    def __init__(
        self,
        bias: float,
        categorical: dict[str, dict[Any, float]],
        numeric: dict[str, tuple[float, float]],
    ) -> None:
        self.bias = bias
        self.categorical = categorical
        self.numeric = numeric
        self._categorical_tables = tuple(categorical.values())
        self._numeric_params = tuple(numeric.values())
        self._names = tuple(categorical) + tuple(numeric)
        self._get_categorical = operator.attrgetter(*categorical)
        self._get_numeric = operator.attrgetter(*numeric)

    def contributions(self, applicant: Applicant) -> list[float]:
        values = [table[v] for table, v in zip(self._categorical_tables, self._get_categorical(applicant), strict=True)]
        values += [
            k * (x - centre) for (k, centre), x in zip(self._numeric_params, self._get_numeric(applicant), strict=True)
        ]
        return values

    def probability(self, applicant: Applicant) -> float:
        return sigmoid(self.bias + sum(self.contributions(applicant)))

    def explain(self, applicant: Applicant) -> tuple[float, list[Reason]]:
        """Probability of default and the fields that push it up most, largest first (never a prohibited basis)."""
        contributions = self.contributions(applicant)
        probability = sigmoid(self.bias + sum(contributions))
        ranked = sorted(
            ((c, name) for c, name in zip(contributions, self._names, strict=True) if c > 0 and name in GIVEN),
            reverse=True,
        )[:MAX_REASONS]
        return probability, [reason(name, c) for c, name in ranked]

    def to_file(self) -> ScorecardFile:
        return ScorecardFile(
            format=SCORECARD_FORMAT,
            bias=self.bias,
            categorical={name: list(table.items()) for name, table in self.categorical.items()},
            numeric={name: NumericWeight(weight=k, centre=c) for name, (k, c) in self.numeric.items()},
        )

    @classmethod
    def from_file(cls, card: ScorecardFile, where: str) -> Scorer:
        """The scorer a scorecard.json describes; ValueError if it does not fit the API's fields and values."""
        if card.format != SCORECARD_FORMAT:
            raise ValueError(f"{where} has scorecard format {card.format}; this service reads {SCORECARD_FORMAT}")
        if tuple(card.categorical) != CATEGORICAL_FIELDS or tuple(card.numeric) != NUMERIC_FIELDS:
            raise ValueError(f"{where} scores other fields than the API accepts")
        categorical: dict[str, dict[Any, float]] = {}
        for name, pairs in card.categorical.items():
            table = dict(pairs)
            if list(table) != list(allowed_values(name) or ()):
                raise ValueError(f"{where} has categories {list(table)} for {name!r}, but the API accepts others")
            categorical[name] = table
        numeric = {name: (w.weight, w.centre) for name, w in card.numeric.items()}
        return cls(card.bias, categorical, numeric)
