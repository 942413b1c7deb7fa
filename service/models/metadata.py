"""What a version folder's `metadata.json` says about the model in it.

Training writes it once; every load decodes it with these types and checks it
against the API's schema before anything else in the folder is read.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Literal

import msgspec

from service.schemas import APPLICANT_FIELDS, RISK_CATEGORIES

METADATA_NAME = "metadata.json"
ARTIFACT_NAME = "model.joblib"
SCORECARD_NAME = "scorecard.json"
CHECKS_NAME = "checks.json"

FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

Kind = Literal["logistic", "boosting"]
KINDS: tuple[str, ...] = ("logistic", "boosting")


class ModelError(Exception):
    """A model version cannot be used; the message says why and how to fix it."""


class FeatureInfo(msgspec.Struct, omit_defaults=True):
    name: str
    kind: str  # "categorical" or "numeric"
    values: list[Any] | None = None
    training_frequencies: list[float] | None = None
    minimum: float | None = None
    maximum: float | None = None
    training_mean: float | None = None


class RiskBand(msgspec.Struct):
    category: str
    upper_bound: float


class Metrics(msgspec.Struct):
    roc_auc: float
    gini: float
    ks: float
    brier: float


class TrainingInfo(msgspec.Struct):
    data: str
    rows: int
    train_rows: int
    held_out_rows: int
    held_out_fraction: float
    seed: int
    excluded_columns: list[str]
    positive_class: str


class SelfCheck(msgspec.Struct):
    """How far the folded scorecard was from the pipeline's predict_proba at training, over every row."""

    rows: int
    max_difference: float


class Bins(msgspec.Struct, omit_defaults=True):
    """A training distribution: a share of the training rows per bin.

    Categorical: one bin per value, in `values`. Numeric: `edges` are the upper
    bounds of all bins but the last, each bin closed on the right (x <= edge), the
    last one open (x > the last edge); n edges, n + 1 bins.
    """

    frequencies: list[float]
    values: list[Any] | None = None
    edges: list[float] | None = None


class TrainingDistribution(msgspec.Struct):
    """What population stability is measured against: the probability of default by
    training deciles, and every feature by its bins (categories; deciles for numerics)."""

    probability: Bins
    features: dict[str, Bins]


class Metadata(msgspec.Struct, kw_only=True):
    name: str
    version: str
    kind: Kind = "logistic"
    trained_at: dt.datetime
    libraries: dict[str, str]
    # The pickled pipeline and its sha256.
    artifact: str
    sha256: str
    # Every other file of the version and its sha256: a load checks them all.
    files: dict[str, str] = {}
    features: list[FeatureInfo]
    cutoff: float
    risk_bands: list[RiskBand]
    metrics: Metrics
    training: TrainingInfo
    self_check: SelfCheck | None = None
    # None for a version trained before it was recorded: monitoring then reports no PSI.
    training_distribution: TrainingDistribution | None = None


def decode(raw: bytes, where: str) -> Metadata:
    """Decode and check a metadata.json; ModelError names the file and the problem."""
    try:
        metadata = msgspec.json.decode(raw, type=Metadata)
    except msgspec.DecodeError as exc:
        raise ModelError(f"{where} is not valid model metadata: {exc}.") from exc
    categories = [band.category for band in metadata.risk_bands]
    bounds = [band.upper_bound for band in metadata.risk_bands]
    if tuple(categories) != RISK_CATEGORIES or bounds != sorted(bounds) or not bounds or bounds[-1] != 1.0:
        raise ModelError(
            f"{where} must list the risk bands {list(RISK_CATEGORIES)} with ascending upper bounds ending at 1.0."
        )
    if not 0.0 < metadata.cutoff < 1.0:
        raise ModelError(f"{where} has cut-off {metadata.cutoff}; it must lie strictly between 0 and 1.")
    if [f.name for f in metadata.features] != list(APPLICANT_FIELDS):
        raise ModelError(f"{where} lists other features than the API accepts; retrain this version.")
    for name in (metadata.artifact, *metadata.files):
        # Files of the version, in its folder: a name that reaches elsewhere is refused.
        if not FILE_NAME.fullmatch(name):
            raise ModelError(f"{where} names a file {name!r}; a version's files are plain names in its folder.")
    return metadata
