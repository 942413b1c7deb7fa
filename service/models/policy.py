"""From a probability of default to what the lender acts on: decision, risk band, score.

The cut-off and the risk bands come with each model version (its metadata); the
referral band is the lender's (`REFER_BAND`), the same for every version, so a
champion and its challenger are judged by one rule.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from service.models.metadata import Metadata

# Scorecard scaling: 600 points at 50:1 good:bad odds, 20 points to double the odds.
SCORE_OFFSET = 487.123
SCORE_FACTOR = 28.8539
SCORE_P_CLIP = 1e-6


def scorecard_points(probability: float) -> int:
    p = min(max(probability, SCORE_P_CLIP), 1 - SCORE_P_CLIP)
    return round(SCORE_OFFSET + SCORE_FACTOR * math.log((1 - p) / p))


@dataclass(frozen=True)
class Policy:
    cutoff: float
    bounds: tuple[float, ...]
    categories: tuple[str, ...]
    # [lower, upper): manual review by an underwriter instead of an automatic answer.
    refer_band: tuple[float, float] | None = None

    @classmethod
    def of(cls, metadata: Metadata, refer_band: tuple[float, float] | None) -> Policy:
        return cls(
            cutoff=metadata.cutoff,
            bounds=tuple(band.upper_bound for band in metadata.risk_bands),
            categories=tuple(band.category for band in metadata.risk_bands),
            refer_band=refer_band,
        )

    def decision(self, probability: float) -> str:
        band = self.refer_band
        if band is not None and band[0] <= probability < band[1]:
            return "refer"
        return "decline" if probability >= self.cutoff else "approve"

    def risk_category(self, probability: float) -> str:
        index = bisect.bisect_right(self.bounds, probability)
        return self.categories[min(index, len(self.bounds) - 1)]
