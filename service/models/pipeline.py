"""The scikit-learn side of the models: pipelines, folding a logistic one, unpickling a version.

Imported by training, by the boosting challenger's own process and by tests,
never by a serving worker: importing scikit-learn costs ~0.8 s and ~80 MiB.
"""

from __future__ import annotations

import io
import math
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

from service.models import registry
from service.models.metadata import CHECKS_NAME, FeatureInfo, Metadata, ModelError
from service.models.scorecard import CATEGORICAL_FIELDS, NUMERIC_FIELDS, Scorer
from service.schemas import APPLICANT_FIELDS, Applicant, allowed_values

_applicant_values = operator.attrgetter(*APPLICANT_FIELDS)


def to_matrix(applicants: Sequence[Applicant]) -> np.ndarray:
    """Applicants as the object matrix the pipelines are fitted on (columns in schema order)."""
    return rows_to_matrix([_applicant_values(a) for a in applicants])


def rows_to_matrix(rows: Sequence[Sequence[Any]]) -> np.ndarray:
    return np.array(rows, dtype=object)


def _categories() -> list[list[Any]]:
    # From the API schema, not from the data: a value the training rows never show
    # still has a (zero) weight, or its own ordinal code.
    return [list(allowed_values(f) or ()) for f in CATEGORICAL_FIELDS]


def _columns() -> tuple[list[int], list[int]]:
    return [APPLICANT_FIELDS.index(f) for f in CATEGORICAL_FIELDS], [APPLICANT_FIELDS.index(f) for f in NUMERIC_FIELDS]


def build(kind: str, seed: int) -> Pipeline:
    categorical, numeric = _columns()
    if kind == "logistic":
        features = ColumnTransformer(
            [
                ("categorical", OneHotEncoder(categories=_categories()), categorical),
                ("numeric", StandardScaler(), numeric),
            ],
            sparse_threshold=0.0,
        )
        return Pipeline([("features", features), ("regression", LogisticRegression(C=1.0, max_iter=5000))])
    # Gradient-boosted trees on ordinal-coded categories (native categorical splits).
    features = ColumnTransformer(
        [("categorical", OrdinalEncoder(categories=_categories()), categorical), ("numeric", "passthrough", numeric)],
        sparse_threshold=0.0,
    )
    boosting = HistGradientBoostingClassifier(
        categorical_features=list(range(len(categorical))),
        learning_rate=0.05,
        max_iter=200,
        max_leaf_nodes=15,
        l2_regularization=1.0,
        random_state=seed,
    )
    return Pipeline([("features", features), ("boosting", boosting)])


def fold(pipeline: Pipeline, features: list[FeatureInfo]) -> Scorer:
    """Fold the fitted one-hot encoder, scaler and logistic regression into weights."""
    try:
        transformer = pipeline.named_steps["features"]
        regression = pipeline.named_steps["regression"]
        encoder = transformer.named_transformers_["categorical"]
        scaler = transformer.named_transformers_["numeric"]
        slices = transformer.output_indices_
    except (AttributeError, KeyError) as exc:
        raise ModelError(f"The pipeline is not the logistic pipeline this service trains ({exc}).") from exc
    if list(regression.classes_) != [0, 1]:
        raise ModelError(f"The model's classes are {list(regression.classes_)}, expected [0, 1] (1 = bad).")
    coef = regression.coef_[0]
    by_name = {f.name: f for f in features}

    categorical: dict[str, dict[Any, float]] = {}
    bias = float(regression.intercept_[0])
    weights = coef[slices["categorical"]]
    offset = 0
    for name, categories in zip(CATEGORICAL_FIELDS, encoder.categories_, strict=True):
        field_weights = [float(w) for w in weights[offset : offset + len(categories)]]
        offset += len(categories)
        # Centre each field on the training average so contributions explain the
        # distance from a typical applicant; the centre moves into the bias.
        frequencies = by_name[name].training_frequencies or []
        centre = math.fsum(f * w for f, w in zip(frequencies, field_weights, strict=True))
        bias += centre
        categorical[name] = {v: w - centre for v, w in zip(categories.tolist(), field_weights, strict=True)}

    numeric: dict[str, tuple[float, float]] = {}
    weights = coef[slices["numeric"]]
    for i, name in enumerate(NUMERIC_FIELDS):
        # StandardScaler's mean_ is the training average, so no extra centring.
        numeric[name] = (float(weights[i] / scaler.scale_[i]), float(scaler.mean_[i]))
    return Scorer(bias, categorical, numeric)


def probabilities(pipeline: Pipeline, matrix: np.ndarray) -> list[float]:
    return [float(p) for p in pipeline.predict_proba(matrix)[:, 1]]


def load(folder: Path) -> tuple[Metadata, Pipeline, float]:
    """Verify and unpickle a version's pipeline; self-check it against the recorded probabilities.

    Returns the metadata, the pipeline, and the largest difference seen. Only an
    artifact whose bytes match the metadata's sha256 is unpickled (unpickling runs
    code), and only with the scikit-learn version that trained it.
    """
    metadata, _ = registry.read_metadata(folder)
    files = registry.verify_files(folder, metadata)
    trained_with = metadata.libraries.get("scikit-learn")
    if trained_with != sklearn.__version__:
        raise ModelError(
            f"{metadata.version} was trained with scikit-learn {trained_with}, but scikit-learn "
            f"{sklearn.__version__} is installed. Install the pinned version or retrain it."
        )
    try:
        pipeline = joblib.load(io.BytesIO(files[metadata.artifact]))
    except Exception as exc:  # a corrupt pickle can raise almost anything
        raise ModelError(f"{folder / metadata.artifact} cannot be unpickled ({exc!r}).") from exc
    if CHECKS_NAME not in files:
        raise ModelError(f"{metadata.version} has no {CHECKS_NAME}; retrain it.")
    checks = registry.read_checks(folder, files[CHECKS_NAME])
    got = probabilities(pipeline, to_matrix(checks.applicants))
    worst = max(abs(a - b) for a, b in zip(got, checks.probabilities, strict=True))
    if not worst <= registry.MAX_PROBABILITY_DIFFERENCE:
        raise ModelError(
            f"{metadata.version}'s pipeline no longer reproduces its recorded probabilities (off by {worst:.3g}); "
            "refusing to serve it."
        )
    return metadata, pipeline, worst
