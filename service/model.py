"""The credit model: its artifact, its metadata, and the direct scorer derived from it.

The artifact is a fitted scikit-learn pipeline (one-hot categoricals and scaled
numerics into a logistic regression). Calling it per request would cost ~5 ms of
pandas/sklearn overhead on the event loop, so at load time we fold it into a
`Scorer`: a weight per category, a weight and centre per numeric, a bias and a
sigmoid, a few microseconds per applicant. Loading refuses to go on unless that
scorer reproduces the pipeline's `predict_proba` on the whole data set.
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
import io
import math
import operator
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from service import dataset
from service.schemas import APPLICANT_FIELDS, RISK_CATEGORIES, Applicant, Decision, Reason, allowed_values

MAX_PROBABILITY_DIFFERENCE = 1e-9
MAX_REASONS = 4
# Scorecard scaling: 600 points at 50:1 good:bad odds, 20 points to double the odds.
SCORE_OFFSET = 487.123
SCORE_FACTOR = 28.8539
SCORE_P_CLIP = 1e-6


class ModelError(Exception):
    """The model artifact or its metadata cannot be used; the message says how to fix it."""


# -- metadata ----------------------------------------------------------------


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


class Metadata(msgspec.Struct):
    name: str
    version: str
    trained_at: dt.datetime
    libraries: dict[str, str]
    artifact: str
    sha256: str
    features: list[FeatureInfo]
    cutoff: float
    risk_bands: list[RiskBand]
    metrics: Metrics
    training: TrainingInfo


def metadata_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + ".metadata.json")


# -- pipeline input ------------------------------------------------------------

CATEGORICAL_FIELDS: tuple[str, ...] = tuple(f for f in APPLICANT_FIELDS if allowed_values(f) is not None)
NUMERIC_FIELDS: tuple[str, ...] = tuple(f for f in APPLICANT_FIELDS if allowed_values(f) is None)


def to_matrix(applicants: Sequence[Applicant]) -> np.ndarray:
    """Applicants as the object matrix the sklearn pipeline was fitted on (columns in schema order)."""
    getter = operator.attrgetter(*APPLICANT_FIELDS)
    return np.array([getter(a) for a in applicants], dtype=object)


# -- the direct scorer ---------------------------------------------------------


def _sigmoid(z: float) -> float:
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
        self._categorical_names = tuple(categorical)
        self._categorical_tables = tuple(categorical.values())
        self._numeric_names = tuple(numeric)
        self._numeric_params = tuple(numeric.values())
        self._names = self._categorical_names + self._numeric_names
        self._get_categorical = operator.attrgetter(*self._categorical_names)
        self._get_numeric = operator.attrgetter(*self._numeric_names)

    def contributions(self, applicant: Applicant) -> list[float]:
        values = [table[v] for table, v in zip(self._categorical_tables, self._get_categorical(applicant), strict=True)]
        values += [
            k * (x - centre) for (k, centre), x in zip(self._numeric_params, self._get_numeric(applicant), strict=True)
        ]
        return values

    def probability(self, applicant: Applicant) -> float:
        return _sigmoid(self.bias + sum(self.contributions(applicant)))

    def explain(self, applicant: Applicant) -> tuple[float, list[Reason]]:
        """Probability of default and the fields that push it up most, largest first."""
        contributions = self.contributions(applicant)
        probability = _sigmoid(self.bias + sum(contributions))
        ranked = sorted(
            ((c, name) for c, name in zip(contributions, self._names, strict=True) if c > 0),
            reverse=True,
        )[:MAX_REASONS]
        return probability, [Reason(feature=name, contribution=round(c, 6)) for c, name in ranked]

    @classmethod
    def from_pipeline(cls, pipeline: Any, features: list[FeatureInfo]) -> Scorer:
        """Fold the fitted one-hot encoder, scaler and logistic regression into weights."""
        try:
            transformer = pipeline.named_steps["features"]
            regression = pipeline.named_steps["regression"]
            encoder = transformer.named_transformers_["categorical"]
            scaler = transformer.named_transformers_["numeric"]
            slices = transformer.output_indices_
        except (AttributeError, KeyError) as exc:
            raise ModelError(
                f"The artifact is not the pipeline this service trains ({exc}); run `make train`."
            ) from exc
        coef = regression.coef_[0]
        if list(regression.classes_) != [0, 1]:
            raise ModelError(f"The model's classes are {list(regression.classes_)}, expected [0, 1] (1 = bad).")
        by_name = {f.name: f for f in features}

        categorical: dict[str, dict[Any, float]] = {}
        bias = float(regression.intercept_[0])
        weights = coef[slices["categorical"]]
        offset = 0
        for name, categories in zip(CATEGORICAL_FIELDS, encoder.categories_, strict=True):
            info = by_name[name]
            expected = list(allowed_values(name) or ())
            if list(categories) != expected or info.values != expected:
                raise ModelError(
                    f"The model's categories for {name!r} are {list(categories)}, but the API accepts {expected}; "
                    "run `make train`."
                )
            field_weights = [float(w) for w in weights[offset : offset + len(categories)]]
            offset += len(categories)
            # Centre each field on the training average so contributions explain the
            # distance from a typical applicant; the centre moves into the bias.
            frequencies = info.training_frequencies or []
            centre = math.fsum(f * w for f, w in zip(frequencies, field_weights, strict=True))
            bias += centre
            categorical[name] = {v: w - centre for v, w in zip(categories.tolist(), field_weights, strict=True)}

        numeric: dict[str, tuple[float, float]] = {}
        weights = coef[slices["numeric"]]
        for i, name in enumerate(NUMERIC_FIELDS):
            # StandardScaler's mean_ is the training average, so no extra centring.
            numeric[name] = (float(weights[i] / scaler.scale_[i]), float(scaler.mean_[i]))
        return cls(bias, categorical, numeric)


# -- the loaded model ----------------------------------------------------------


class CreditModel:
    def __init__(self, metadata: Metadata, metadata_json: bytes, scorer: Scorer, max_difference: float) -> None:
        self.metadata = metadata
        self.metadata_json = metadata_json
        self.scorer = scorer
        # Largest |direct - sklearn| probability seen by the start-up self-check.
        self.max_difference = max_difference
        self._bounds = [band.upper_bound for band in metadata.risk_bands]
        self._categories = [band.category for band in metadata.risk_bands]

    def risk_category(self, probability: float) -> str:
        index = bisect.bisect_right(self._bounds, probability)
        return self._categories[min(index, len(self._bounds) - 1)]

    def decide(self, applicant: Applicant, decision_id: uuid.UUID, created_at: dt.datetime) -> Decision:
        probability, reasons = self.scorer.explain(applicant)
        return Decision(
            id=decision_id,
            decision="decline" if probability >= self.metadata.cutoff else "approve",
            probability_of_default=probability,
            risk_category=self.risk_category(probability),  # type: ignore[arg-type]
            score=scorecard_points(probability),
            reasons=reasons,
            model_version=self.metadata.version,
            created_at=created_at,
        )


def scorecard_points(probability: float) -> int:
    p = min(max(probability, SCORE_P_CLIP), 1 - SCORE_P_CLIP)
    return round(SCORE_OFFSET + SCORE_FACTOR * math.log((1 - p) / p))


def load(model_path: Path) -> CreditModel:
    """Check, unpickle and self-test the artifact; raise ModelError with the fix on any problem."""
    meta_path = metadata_path(model_path)
    if not model_path.is_file():
        raise ModelError(f"Model artifact {model_path} does not exist; run `make train` to build it.")
    if not meta_path.is_file():
        raise ModelError(f"Model metadata {meta_path} does not exist; run `make train` to build it.")
    metadata_json = meta_path.read_bytes()
    try:
        metadata = msgspec.json.decode(metadata_json, type=Metadata)
    except msgspec.DecodeError as exc:
        raise ModelError(f"Model metadata {meta_path} is not valid: {exc}; run `make train`.") from exc
    _check_metadata(metadata, meta_path)

    # Hash the bytes we are about to unpickle, not the file a second time: unpickling
    # runs code, so only an artifact that matches its metadata may be loaded.
    blob = model_path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != metadata.sha256:
        raise ModelError(
            f"Model artifact {model_path} has sha256 {digest}, but {meta_path.name} records {metadata.sha256}: "
            "the artifact was changed or belongs to another training run. Run `make train` to rebuild both."
        )
    import joblib
    import sklearn

    trained_with = metadata.libraries.get("scikit-learn")
    if trained_with != sklearn.__version__:
        raise ModelError(
            f"Model artifact {model_path} was trained with scikit-learn {trained_with}, "
            f"but scikit-learn {sklearn.__version__} is installed. Install the pinned version "
            "(pip install -r requirements.txt) or run `make train` to retrain with this one."
        )
    try:
        pipeline = joblib.load(io.BytesIO(blob))
    except Exception as exc:  # a corrupt pickle can raise almost anything
        raise ModelError(f"Model artifact {model_path} cannot be unpickled ({exc!r}); run `make train`.") from exc

    scorer = Scorer.from_pipeline(pipeline, metadata.features)
    data_dir = model_path.parent / Path(metadata.training.data).parent
    try:
        data = dataset.load(data_dir)
    except (OSError, dataset.DatasetError) as exc:
        raise ModelError(
            f"The self-check needs the training data beside the artifact, in {data_dir}: {exc}. "
            "Copy artifacts/data/ next to the model, or run `make train`."
        ) from exc
    expected = pipeline.predict_proba(to_matrix(data.applicants))[:, 1]
    direct = np.array([scorer.probability(a) for a in data.applicants])
    max_difference = float(np.max(np.abs(direct - expected)))
    if not max_difference <= MAX_PROBABILITY_DIFFERENCE:
        raise ModelError(
            f"The direct scorer differs from scikit-learn's predict_proba by {max_difference:.3g} "
            f"(allowed {MAX_PROBABILITY_DIFFERENCE:g}) on {len(direct)} applicants; refusing to serve it."
        )
    return CreditModel(metadata=metadata, metadata_json=metadata_json, scorer=scorer, max_difference=max_difference)


def _check_metadata(metadata: Metadata, meta_path: Path) -> None:
    categories = [band.category for band in metadata.risk_bands]
    bounds = [band.upper_bound for band in metadata.risk_bands]
    if tuple(categories) != RISK_CATEGORIES or bounds != sorted(bounds) or bounds[-1] != 1.0:
        raise ModelError(
            f"{meta_path} must list the risk bands {list(RISK_CATEGORIES)} with ascending upper bounds ending at 1.0."
        )
    if not 0.0 < metadata.cutoff < 1.0:
        raise ModelError(f"{meta_path} has cut-off {metadata.cutoff}; it must lie strictly between 0 and 1.")
    if [f.name for f in metadata.features] != list(APPLICANT_FIELDS):
        raise ModelError(f"{meta_path} lists other features than the API accepts; run `make train`.")
