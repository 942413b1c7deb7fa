"""The model: the direct scorer equals sklearn, the metrics hold, the artifact is checked before use."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import joblib
import msgspec
import numpy as np
import pytest

from service import dataset, model
from service.model import CreditModel, ModelError
from service.schemas import allowed_values
from service.settings import DEFAULT_MODEL_PATH


@pytest.fixture(scope="module")
def credit_model() -> CreditModel:
    return model.load(DEFAULT_MODEL_PATH)


@pytest.fixture
def artifact_copy(tmp_path: Path) -> Path:
    """The committed artifact, its metadata and the data set, copied where a test may damage them."""
    shutil.copy(DEFAULT_MODEL_PATH, tmp_path / DEFAULT_MODEL_PATH.name)
    shutil.copy(model.metadata_path(DEFAULT_MODEL_PATH), tmp_path / model.metadata_path(DEFAULT_MODEL_PATH).name)
    shutil.copytree(DEFAULT_MODEL_PATH.parent / "data", tmp_path / "data")
    return tmp_path / DEFAULT_MODEL_PATH.name


def test_direct_scorer_equals_sklearn_on_every_row(credit_model: CreditModel) -> None:
    data = dataset.load()
    pipeline = joblib.load(DEFAULT_MODEL_PATH)
    expected = pipeline.predict_proba(model.to_matrix(data.applicants))[:, 1]
    direct = np.array([credit_model.scorer.probability(a) for a in data.applicants])
    assert len(direct) == 1000
    assert np.max(np.abs(direct - expected)) <= 1e-9
    assert credit_model.max_difference <= 1e-9


def test_held_out_roc_auc_is_at_least_075(credit_model: CreditModel) -> None:
    metrics = credit_model.metadata.metrics
    assert metrics.roc_auc >= 0.75
    assert metrics.gini == pytest.approx(2 * metrics.roc_auc - 1)
    assert 0 < metrics.ks < 1 and 0 < metrics.brier < 0.25


def test_training_reproduces_artifact_and_metrics(tmp_path: Path, credit_model: CreditModel) -> None:
    """`make train` in a fresh process writes the committed artifact byte for byte, with the same metrics."""
    output = tmp_path / "classifier.joblib"
    subprocess.run([sys.executable, "-m", "service.training", "--output", str(output)], check=True, capture_output=True)
    metadata = msgspec.json.decode(model.metadata_path(output).read_bytes(), type=model.Metadata)
    assert metadata.metrics == credit_model.metadata.metrics
    assert metadata.sha256 == credit_model.metadata.sha256
    assert hashlib.sha256(output.read_bytes()).hexdigest() == metadata.sha256


def test_training_leaves_out_protected_columns(credit_model: CreditModel) -> None:
    names = [f.name for f in credit_model.metadata.features]
    assert credit_model.metadata.training.excluded_columns == ["personal_status_and_sex", "foreign_worker"]
    assert not set(names) & {"personal_status_and_sex", "foreign_worker"}


def test_reasons_are_contributions_against_average_applicant(credit_model: CreditModel) -> None:
    """Reasons agree with contributions computed from sklearn's own transform and coefficients."""
    pipeline = joblib.load(DEFAULT_MODEL_PATH)
    transformer = pipeline.named_steps["features"]
    coef = pipeline.named_steps["regression"].coef_[0]
    data = dataset.load()
    train_idx, _ = _split(data, credit_model)
    average = transformer.transform(model.to_matrix([data.applicants[i] for i in train_idx])).mean(axis=0)
    for applicant in data.applicants[:100]:
        row = transformer.transform(model.to_matrix([applicant]))[0]
        expected: dict[str, float] = {}
        for kind, names in (("categorical", model.CATEGORICAL_FIELDS), ("numeric", model.NUMERIC_FIELDS)):
            offset = transformer.output_indices_[kind].start
            for name in names:
                width = len(allowed_values(name) or (None,))  # one column per category, or one numeric
                cols = slice(offset, offset + width)
                expected[name] = float(coef[cols] @ (row[cols] - average[cols]))
                offset += width
        ranked = sorted(((c, n) for n, c in expected.items() if c > 0), reverse=True)[:4]
        decision = credit_model.decide(applicant, uuid.uuid4(), dt.datetime.now(dt.UTC))
        assert [r.feature for r in decision.reasons] == [n for _, n in ranked]
        assert [r.contribution for r in decision.reasons] == pytest.approx([c for c, _ in ranked], abs=1e-6)


def _split(data: dataset.Dataset, credit_model: CreditModel) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    meta = credit_model.metadata.training
    idx = np.arange(len(data.applicants))
    return tuple(  # type: ignore[return-value]
        train_test_split(idx, test_size=meta.held_out_fraction, stratify=np.array(data.labels), random_state=meta.seed)
    )


def test_contributions_average_to_zero_over_training_rows(credit_model: CreditModel) -> None:
    data = dataset.load()
    train_idx, _ = _split(data, credit_model)
    rows = np.array([credit_model.scorer.contributions(data.applicants[i]) for i in train_idx])
    assert np.abs(rows.mean(axis=0)).max() < 1e-9


@pytest.mark.parametrize(
    ("p", "category"),
    [
        (0.01, "very_low"),
        (0.05, "low"),
        (0.16, "low"),
        (1 / 6, "medium"),
        (0.5, "high"),
        (0.99, "very_high"),
        (1.0, "very_high"),
    ],
)
def test_risk_category_uses_ascending_upper_bounds(credit_model: CreditModel, p: float, category: str) -> None:
    assert credit_model.risk_category(p) == category


def test_scorecard_points_anchor_and_clip() -> None:
    assert model.scorecard_points(1 / 51) == 600  # 50:1 good:bad odds
    assert model.scorecard_points(1 / 101) == 620  # odds doubled: +20 points
    assert model.scorecard_points(0.0) == model.scorecard_points(1e-6)
    assert model.scorecard_points(1.0) == model.scorecard_points(1 - 1e-6)


def test_load_refuses_missing_artifact(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist; run `make train`"):
        model.load(tmp_path / "classifier.joblib")


def test_load_refuses_artifact_with_wrong_sha256(artifact_copy: Path) -> None:
    with artifact_copy.open("ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(ModelError, match=r"has sha256 .* but .* records .* Run `make train`"):
        model.load(artifact_copy)


def test_load_refuses_other_scikit_learn_version(artifact_copy: Path) -> None:
    meta_path = model.metadata_path(artifact_copy)
    meta = json.loads(meta_path.read_text())
    meta["libraries"]["scikit-learn"] = "0.0.1"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"trained with scikit-learn 0.0.1, but scikit-learn .* is installed"):
        model.load(artifact_copy)


def test_load_refuses_scorer_that_drifts_from_sklearn(artifact_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = model.Scorer.from_pipeline

    def skewed(pipeline: object, features: list[model.FeatureInfo]) -> model.Scorer:
        scorer = original(pipeline, features)
        scorer.bias += 1e-6
        return scorer

    monkeypatch.setattr(model.Scorer, "from_pipeline", staticmethod(skewed))
    with pytest.raises(ModelError, match="differs from scikit-learn"):
        model.load(artifact_copy)


def test_load_refuses_corrupt_metadata(artifact_copy: Path) -> None:
    model.metadata_path(artifact_copy).write_text("{not json")
    with pytest.raises(ModelError, match="is not valid"):
        model.load(artifact_copy)


def test_metadata_lists_every_feature_with_allowed_values(credit_model: CreditModel) -> None:
    info = msgspec.to_builtins(credit_model.metadata)
    by_name = {f["name"]: f for f in info["features"]}
    assert by_name["purpose"]["values"][0] == "car_new"
    assert by_name["telephone"]["values"] == [False, True]
    assert by_name["age"]["minimum"] == 18 and by_name["age"]["maximum"] == 120
    assert info["cutoff"] == pytest.approx(1 / 6)
