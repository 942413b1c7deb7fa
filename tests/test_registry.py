"""The model registry: the scorecard equals its pipeline, a load checks every file, training writes whole versions."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import msgspec
import numpy as np
import pytest

from service import dataset
from service.models import pipeline, registry
from service.models.metadata import ModelError
from service.models.policy import Policy, scorecard_points
from service.models.registry import Registry, ScorecardModel, UnknownVersion, load_scorecard
from service.reasons import REASONS
from service.schemas import allowed_values
from service.settings import DEFAULT_MODEL_DIR
from tests.conftest import SHIPPED_VERSION, Versions, shipped_model


@pytest.fixture(scope="module")
def credit_model() -> ScorecardModel:
    return shipped_model()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The shipped version, copied where a test may damage it."""
    target = tmp_path / SHIPPED_VERSION
    shutil.copytree(DEFAULT_MODEL_DIR / SHIPPED_VERSION, target)
    return target


def _rehash(folder: Path, name: str) -> None:
    """Record a changed file's new sha256 in the metadata, as a forger (or a careless edit) would."""
    meta = json.loads((folder / "metadata.json").read_text())
    meta["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "metadata.json").write_text(json.dumps(meta))


# -- the scorecard against the pipeline ----------------------------------------------------


def test_scorecard_equals_sklearn_on_every_row(credit_model: ScorecardModel) -> None:
    data = dataset.load()
    _, fitted, _ = pipeline.load(DEFAULT_MODEL_DIR / SHIPPED_VERSION)
    expected = fitted.predict_proba(pipeline.to_matrix(data.applicants))[:, 1]
    direct = np.array([credit_model.scorer.probability(a) for a in data.applicants])
    assert len(direct) == 1000
    assert np.max(np.abs(direct - expected)) <= 1e-9
    assert credit_model.metadata.self_check is not None
    assert credit_model.metadata.self_check.rows == 1000 and credit_model.metadata.self_check.max_difference <= 1e-9


def test_loading_the_champion_needs_neither_numpy_nor_sklearn() -> None:
    """A serving worker verifies and loads a logistic version with the standard library and msgspec alone."""
    code = (
        "import sys, pathlib; from service.models.registry import Registry, load_scorecard;"
        f"registry = Registry(pathlib.Path({str(DEFAULT_MODEL_DIR)!r}));"
        f"m = load_scorecard(registry.get({SHIPPED_VERSION!r}), None);"
        "print(m.max_difference, sorted(k for k in sys.modules if k.split('.')[0] in ('numpy', 'sklearn', 'joblib')))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split(" ", 1)
    assert float(out[0]) <= 1e-9
    assert out[1].strip() == "[]"


def test_held_out_roc_auc_is_at_least_075(credit_model: ScorecardModel) -> None:
    metrics = credit_model.metadata.metrics
    assert metrics.roc_auc >= 0.75
    assert metrics.gini == pytest.approx(2 * metrics.roc_auc - 1)
    assert 0 < metrics.ks < 1 and 0 < metrics.brier < 0.25


def _numbers(value: object) -> list[float]:
    """Every number in a decoded JSON document, in document order."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


def test_training_is_deterministic_and_reproduces_the_shipped_version(
    tmp_path: Path, credit_model: ScorecardModel
) -> None:
    """Training twice in fresh processes writes the same bytes, and the shipped version's model to rounding.

    Across machines the bytes may differ: another CPU's BLAS and SIMD kernels round
    differently (on an AMD EPYC, the shipped version's coefficients came out up to
    1e-12 apart, its probabilities 2e-12), so against the shipped files the numbers
    are compared, to 1e-9."""
    written = []
    for run in ("first", "second"):
        done = subprocess.run(
            [sys.executable, "-m", "service.training", "--registry", str(tmp_path / run), "--version", SHIPPED_VERSION],
            check=True,
            capture_output=True,
            text=True,
        )
        assert done.stdout.strip() == SHIPPED_VERSION  # the version alone on stdout, for scripts
        written.append(tmp_path / run / SHIPPED_VERSION)
    files = ("model.joblib", "scorecard.json", "checks.json")
    assert [(written[0] / f).read_bytes() for f in files] == [(written[1] / f).read_bytes() for f in files]
    new, again = (registry.read_metadata(folder)[0] for folder in written)
    assert (new.sha256, new.files, new.metrics) == (again.sha256, again.files, again.metrics)
    shipped = credit_model.metadata
    assert msgspec.to_builtins(new.metrics) == pytest.approx(msgspec.to_builtins(shipped.metrics), rel=1e-9)
    assert sorted(new.files) == sorted(shipped.files)
    for name in ("scorecard.json", "checks.json"):
        ours, theirs = (
            json.loads((folder / name).read_text()) for folder in (written[0], DEFAULT_MODEL_DIR / SHIPPED_VERSION)
        )
        assert _numbers(ours) == pytest.approx(_numbers(theirs), abs=1e-9, rel=1e-9), name


def test_training_never_overwrites_a_version(tmp_path: Path) -> None:
    first = subprocess.run(
        [sys.executable, "-m", "service.training", "--registry", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert first.startswith("german-credit-lr-") and first.endswith("Z")
    again = subprocess.run(
        [sys.executable, "-m", "service.training", "--registry", str(tmp_path), "--version", first],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1
    assert "already exists" in again.stderr
    # No half-written (hidden) folder is left behind, and the registry lists the one version.
    assert [p.name for p in tmp_path.iterdir()] == [first]
    assert [e.version for e in Registry(tmp_path).scan()] == [first]


def test_training_leaves_out_protected_columns(credit_model: ScorecardModel) -> None:
    names = [f.name for f in credit_model.metadata.features]
    assert credit_model.metadata.training.excluded_columns == ["personal_status_and_sex", "foreign_worker"]
    assert not set(names) & {"personal_status_and_sex", "foreign_worker"}


def test_reasons_are_contributions_against_average_applicant(credit_model: ScorecardModel) -> None:
    """Reasons agree with contributions computed from sklearn's own transform and coefficients."""
    _, fitted, _ = pipeline.load(DEFAULT_MODEL_DIR / SHIPPED_VERSION)
    transformer = fitted.named_steps["features"]
    coef = fitted.named_steps["regression"].coef_[0]
    data = dataset.load()
    train_idx = _train_rows(data, credit_model)
    average = transformer.transform(pipeline.to_matrix([data.applicants[i] for i in train_idx])).mean(axis=0)
    for applicant in data.applicants[:100]:
        row = transformer.transform(pipeline.to_matrix([applicant]))[0]
        expected: dict[str, float] = {}
        for kind, names in (("categorical", pipeline.CATEGORICAL_FIELDS), ("numeric", pipeline.NUMERIC_FIELDS)):
            offset = transformer.output_indices_[kind].start
            for name in names:
                width = len(allowed_values(name) or (None,))  # one column per category, or one numeric
                cols = slice(offset, offset + width)
                expected[name] = float(coef[cols] @ (row[cols] - average[cols]))
                offset += width
        # Age is never given as a reason (a prohibited basis): the next one takes its place.
        ranked = sorted(((c, n) for n, c in expected.items() if c > 0 and n != "age"), reverse=True)[:4]
        decision = credit_model.decide(applicant, uuid.uuid4(), dt.datetime.now(dt.UTC))
        assert [r.feature for r in decision.reasons] == [n for _, n in ranked]
        assert [r.contribution for r in decision.reasons] == pytest.approx([c for c, _ in ranked], abs=1e-6)


# Statements that say which way a field pushes ("too long", "too high", "too short"), and the sign of
# the shipped model's weight that makes them true.
_DIRECTIONS = {
    "duration_months": 1,
    "credit_amount": 1,
    "installment_rate": 1,
    "existing_credits": 1,
    "residence_since": -1,
}
# Categorical statements, and the only categories that may push risk up if the statement is to be true.
_MAY_PUSH_UP = {
    "savings": {"below_100", "100_to_500"},  # "Savings are low"
    "employment_since": {"unemployed", "below_1", "1_to_4"},  # "Length of employment is too short"
    "other_debtors": {"none", "co_applicant"},  # "No guarantor for the credit"
    "property": {"none", "car_other"},  # "Insufficient property or collateral"
    "telephone": {False},  # "No telephone on record"
}


def test_every_reason_statement_points_the_way_the_shipped_model_does(credit_model: ScorecardModel) -> None:
    scorer = credit_model.scorer
    for field, sign in _DIRECTIONS.items():
        weight, _ = scorer.numeric[field]
        assert weight * sign > 0, f"{field}: {REASONS[field]} contradicts the weight {weight}"
    for field, allowed in _MAY_PUSH_UP.items():
        up = {value for value, contribution in scorer.categorical[field].items() if contribution > 0}
        assert up <= allowed, f"{field}: {REASONS[field]} is not true of {up - allowed}"
    assert REASONS["age"] is None
    assert len({r.code for r in REASONS.values() if r is not None}) == len(REASONS) - 1


def _train_rows(data: dataset.Dataset, credit_model: ScorecardModel) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    meta = credit_model.metadata.training
    idx = np.arange(len(data.applicants))
    train, _ = train_test_split(
        idx, test_size=meta.held_out_fraction, stratify=np.array(data.labels), random_state=meta.seed
    )
    return np.asarray(train)


def test_contributions_average_to_zero_over_training_rows(credit_model: ScorecardModel) -> None:
    data = dataset.load()
    rows = np.array([credit_model.scorer.contributions(data.applicants[i]) for i in _train_rows(data, credit_model)])
    assert np.abs(rows.mean(axis=0)).max() < 1e-9


# -- decisions from probabilities -------------------------------------------------------------


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
def test_risk_category_uses_ascending_upper_bounds(credit_model: ScorecardModel, p: float, category: str) -> None:
    assert credit_model.policy.risk_category(p) == category


def test_decision_at_exactly_the_cutoff_is_decline(credit_model: ScorecardModel) -> None:
    policy = credit_model.policy
    below = np.nextafter(policy.cutoff, 0.0)
    assert policy.decision(policy.cutoff) == "decline"
    assert policy.decision(below) == "approve"


def test_referral_band_is_half_open(credit_model: ScorecardModel) -> None:
    policy = Policy.of(credit_model.metadata, (0.10, 0.25))
    assert policy.decision(0.0999) == "approve"
    assert policy.decision(0.10) == "refer"
    assert policy.decision(1 / 6) == "refer"  # inside the band, even at the cut-off
    assert policy.decision(np.nextafter(0.25, 0.0)) == "refer"
    assert policy.decision(0.25) == "decline"


def test_scorecard_points_anchor_and_clip() -> None:
    assert scorecard_points(1 / 51) == 600  # 50:1 good:bad odds
    assert scorecard_points(1 / 101) == 620  # odds doubled: +20 points
    assert scorecard_points(0.0) == scorecard_points(1e-6)
    assert scorecard_points(1.0) == scorecard_points(1 - 1e-6)


# -- every load checks every file ---------------------------------------------------------------


def _load(folder: Path) -> ScorecardModel:
    return load_scorecard(Registry(folder.parent).get(folder.name), None)


def test_registry_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist; set MODEL_DIR or run `make train`"):
        Registry(tmp_path / "nothing").scan()
    with pytest.raises(UnknownVersion, match="no model version 'nope'"):
        Registry(DEFAULT_MODEL_DIR).get("nope")
    with pytest.raises(UnknownVersion):
        Registry(DEFAULT_MODEL_DIR).get("../models")


@pytest.mark.parametrize("name", ["scorecard.json", "checks.json", "model.joblib"])
def test_load_refuses_a_file_whose_hash_differs(folder: Path, name: str) -> None:
    """The pickle is hash-checked too, though a logistic champion never unpickles it."""
    with (folder / name).open("ab") as handle:
        handle.write(b" ")
    with pytest.raises(ModelError, match=rf"{name} has sha256 .* but metadata.json records"):
        _load(folder)


def test_load_refuses_a_scorecard_that_drifts_from_its_pipeline(folder: Path) -> None:
    card = json.loads((folder / "scorecard.json").read_text())
    card["bias"] += 1e-6
    (folder / "scorecard.json").write_text(json.dumps(card))
    _rehash(folder, "scorecard.json")
    with pytest.raises(ModelError, match="differs from its pipeline's recorded probabilities"):
        _load(folder)


def test_load_refuses_a_scorecard_for_other_categories(folder: Path) -> None:
    card = json.loads((folder / "scorecard.json").read_text())
    card["categorical"]["purpose"][0][0] = "yacht"
    (folder / "scorecard.json").write_text(json.dumps(card))
    _rehash(folder, "scorecard.json")
    with pytest.raises(ModelError, match=r"categories .* for 'purpose'"):
        _load(folder)


def test_load_refuses_corrupt_or_misnamed_metadata(folder: Path) -> None:
    meta = json.loads((folder / "metadata.json").read_text())
    meta["version"] = "someone-else"
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="says version 'someone-else', but its folder is"):
        _load(folder)
    (folder / "metadata.json").write_text("{not json")
    with pytest.raises(ModelError, match="is not valid model metadata"):
        _load(folder)
    assert Registry(folder.parent).scan()[0].error is not None


def test_boosting_version_cannot_be_champion(versions: Versions) -> None:
    with pytest.raises(ModelError, match="is a boosting model: only a logistic model can be champion"):
        load_scorecard(Registry(versions.root).get(versions.boosting), None)


def test_pipeline_load_refuses_other_scikit_learn_version(folder: Path) -> None:
    meta = json.loads((folder / "metadata.json").read_text())
    meta["libraries"]["scikit-learn"] = "0.0.1"
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"trained with scikit-learn 0.0.1, but scikit-learn .* is installed"):
        pipeline.load(folder)


def test_boosting_version_reproduces_its_recorded_probabilities(versions: Versions) -> None:
    metadata, _, worst = pipeline.load(versions.root / versions.boosting)
    assert metadata.kind == "boosting" and "scorecard.json" not in metadata.files
    assert worst == 0.0
    assert metadata.metrics.roc_auc > 0.7


def test_registry_lists_versions_oldest_first_and_names_the_newest_logistic(versions: Versions) -> None:
    entries = Registry(versions.root).scan()
    trained = [e.version for e in entries if e.version in (versions.shipped, versions.logistic, versions.boosting)]
    assert trained == [versions.shipped, versions.boosting, versions.logistic]
    folder = versions.root / "test-unreadable"
    folder.mkdir(exist_ok=True)
    (folder / "metadata.json").write_text("{")
    assert Registry(versions.root).scan()[-1].version == "test-unreadable"  # unreadable ones last, with their error
    newest = Registry(versions.root).newest("logistic")
    assert newest is not None and newest.version == versions.logistic


def test_metadata_lists_every_feature_with_allowed_values(credit_model: ScorecardModel) -> None:
    info = msgspec.to_builtins(credit_model.metadata)
    by_name = {f["name"]: f for f in info["features"]}
    assert by_name["purpose"]["values"][0] == "car_new"
    assert by_name["telephone"]["values"] == [False, True]
    assert by_name["age"]["minimum"] == 18 and by_name["age"]["maximum"] == 120
    assert info["cutoff"] == pytest.approx(1 / 6)
    assert info["kind"] == "logistic"
