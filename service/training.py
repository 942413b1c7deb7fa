"""Train a model version into the registry: `python -m service.training --registry DIR`.

    python -m service.training --registry artifacts/models [--version V] [--kind logistic|boosting] [--seed N]

Writes `DIR/<version>/` (model.joblib, metadata.json, checks.json and, for a
logistic model, scorecard.json) and prints the version. A version folder is
written under a hidden temporary name and renamed into place when complete, so
the registry never shows half a version, and an existing version is never
overwritten. Deterministic: a seed (default 42), a stratified split and the
pinned libraries give the same pipeline bytes and held-out metrics on every run;
another seed draws another split, and so another model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import joblib
import msgspec
import numpy as np
import sklearn
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve
from sklearn.model_selection import train_test_split

from service import dataset, monitoring
from service.models import pipeline as pipelines
from service.models.metadata import (
    ARTIFACT_NAME,
    CHECKS_NAME,
    KINDS,
    METADATA_NAME,
    SCORECARD_NAME,
    Bins,
    FeatureInfo,
    Metadata,
    Metrics,
    ModelError,
    RiskBand,
    SelfCheck,
    TrainingDistribution,
    TrainingInfo,
)
from service.models.registry import MAX_PROBABILITY_DIFFERENCE, VERSION_PATTERN, ChecksFile
from service.schemas import APPLICANT_FIELDS, RISK_CATEGORIES, Applicant, allowed_values

NAMES = {"logistic": "german-credit-lr", "boosting": "german-credit-gb"}
SEED = 42
HELD_OUT_FRACTION = 0.3
# The data set's cost matrix: approving a bad applicant costs 5, declining a good
# one costs 1, so declining pays once P(bad) >= 1 / (1 + 5).
CUTOFF = 1 / 6
# Upper bounds of the risk bands; "low" ends at the cut-off, so very_low and low
# are exactly the approvals.
RISK_BOUNDS = (0.05, CUTOFF, 0.35, 0.60, 1.0)
# Every tenth row of the data set becomes a reference applicant for the load-time self-check.
CHECK_STRIDE = 10
DEFAULT_REGISTRY = Path(__file__).resolve().parent.parent / "artifacts" / "models"


def feature_info(train: list[Applicant]) -> list[FeatureInfo]:
    bounds = {f.name: f.type for f in msgspec.inspect.type_info(Applicant).fields}  # type: ignore[attr-defined]
    infos = []
    for name in APPLICANT_FIELDS:
        column = [getattr(a, name) for a in train]
        values = allowed_values(name)
        if values is not None:
            infos.append(
                FeatureInfo(
                    name=name,
                    kind="categorical",
                    values=list(values),
                    training_frequencies=[column.count(v) / len(column) for v in values],
                )
            )
        else:
            kind = bounds[name]
            infos.append(
                FeatureInfo(
                    name=name,
                    kind="numeric",
                    minimum=kind.ge if kind.ge is not None else kind.gt,
                    maximum=kind.le,
                    training_mean=float(np.mean(column)),
                )
            )
    return infos


def training_distribution(train: list[Applicant], probabilities: list[float]) -> TrainingDistribution:
    """The training rows' probability of default by deciles, and each feature by its bins: what PSI compares with."""
    features: dict[str, Bins] = {}
    for name in APPLICANT_FIELDS:
        column = [getattr(a, name) for a in train]
        values = allowed_values(name)
        features[name] = (
            monitoring.categorical_bins(column, values) if values is not None else monitoring.numeric_bins(column)
        )
    return TrainingDistribution(probability=monitoring.numeric_bins(probabilities), features=features)


def held_out_metrics(labels: np.ndarray, probabilities: np.ndarray) -> Metrics:
    auc = float(roc_auc_score(labels, probabilities))
    fpr, tpr, _ = roc_curve(labels, probabilities)
    return Metrics(
        roc_auc=auc,
        gini=2 * auc - 1,
        ks=float(np.max(tpr - fpr)),
        brier=float(brier_score_loss(labels, probabilities)),
    )


def default_version(kind: str, now: dt.datetime) -> str:
    return f"{NAMES[kind]}-{now:%Y%m%dT%H%M%SZ}"


def _encode(value: object) -> bytes:
    return msgspec.json.format(msgspec.json.encode(value), indent=2) + b"\n"


def train(
    registry: Path = DEFAULT_REGISTRY,
    version: str | None = None,
    kind: str = "logistic",
    data_dir: Path = dataset.DATA_DIR,
    seed: int = SEED,
) -> Metadata:
    """Fit, check and write a new version folder; ModelError if the version exists or the fold drifts."""
    if kind not in KINDS:
        raise ModelError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    now = dt.datetime.now(dt.UTC)
    version = version or default_version(kind, now)
    if not VERSION_PATTERN.fullmatch(version):
        raise ModelError(f"Version {version!r} must be 1 to 100 of A-Z a-z 0-9 . _ - and start with a letter or digit.")
    if (registry / version).exists():
        raise ModelError(f"Version {version} already exists in {registry}; a version is never overwritten.")

    data = dataset.load(data_dir)
    indices = np.arange(len(data.applicants))
    labels = np.array(data.labels)
    train_idx, test_idx = train_test_split(indices, test_size=HELD_OUT_FRACTION, stratify=labels, random_state=seed)
    train_rows = [data.applicants[i] for i in train_idx]
    pipeline = pipelines.build(kind, seed)
    pipeline.fit(pipelines.to_matrix(train_rows), labels[train_idx])
    held_out = pipeline.predict_proba(pipelines.to_matrix([data.applicants[i] for i in test_idx]))[:, 1]
    features = feature_info(train_rows)
    distribution = training_distribution(train_rows, pipelines.probabilities(pipeline, pipelines.to_matrix(train_rows)))

    buffer = io.BytesIO()
    joblib.dump(pipeline, buffer)
    files: dict[str, bytes] = {}
    references = data.applicants[::CHECK_STRIDE]
    files[CHECKS_NAME] = _encode(
        ChecksFile(references, pipelines.probabilities(pipeline, pipelines.to_matrix(references)))
    )
    self_check = None
    if kind == "logistic":
        scorer = pipelines.fold(pipeline, features)
        expected = pipelines.probabilities(pipeline, pipelines.to_matrix(data.applicants))
        worst = max(abs(scorer.probability(a) - p) for a, p in zip(data.applicants, expected, strict=True))
        if not worst <= MAX_PROBABILITY_DIFFERENCE:
            raise ModelError(f"The folded scorecard differs from predict_proba by {worst:.3g}; not writing it.")
        self_check = SelfCheck(rows=len(data.applicants), max_difference=worst)
        files[SCORECARD_NAME] = _encode(scorer.to_file())

    field_map = json.loads((data_dir / dataset.FIELDS_NAME).read_text())
    metadata = Metadata(
        name=NAMES[kind],
        version=version,
        kind=kind,  # type: ignore[arg-type]
        trained_at=now,
        libraries={
            "python": platform.python_version(),
            "scikit-learn": sklearn.__version__,
            "numpy": np.__version__,
            "joblib": joblib.__version__,
        },
        artifact=ARTIFACT_NAME,
        sha256=hashlib.sha256(buffer.getvalue()).hexdigest(),
        files={name: hashlib.sha256(blob).hexdigest() for name, blob in sorted(files.items())},
        features=features,
        cutoff=CUTOFF,
        risk_bands=[RiskBand(category=c, upper_bound=b) for c, b in zip(RISK_CATEGORIES, RISK_BOUNDS, strict=True)],
        metrics=held_out_metrics(labels[test_idx], held_out),
        training=TrainingInfo(
            data=f"{data_dir.name}/{dataset.CSV_NAME}",
            rows=len(indices),
            train_rows=len(train_idx),
            held_out_rows=len(test_idx),
            held_out_fraction=HELD_OUT_FRACTION,
            seed=seed,
            excluded_columns=field_map["excluded_columns"],
            positive_class="bad",
        ),
        self_check=self_check,
        training_distribution=distribution,
    )
    files[ARTIFACT_NAME] = buffer.getvalue()
    files[METADATA_NAME] = _encode(metadata)
    _write_folder(registry, version, files)
    return metadata


def _write_folder(registry: Path, version: str, files: dict[str, bytes]) -> None:
    """Write the files into a hidden folder, then rename it into place: all of a version or none of it."""
    registry.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=registry))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a version is read by the service's own user
        for name, blob in files.items():
            (staging / name).write_bytes(blob)
            with (staging / name).open("rb") as handle:
                os.fsync(handle.fileno())
        # rename() onto an existing non-empty folder fails: two trainings cannot share a name.
        staging.rename(registry / version)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelError(f"Could not write version {version} into {registry}: {exc}.") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="the MODEL_DIR to write into")
    parser.add_argument("--version", help="the version name (default: <name>-<UTC timestamp>)")
    parser.add_argument("--kind", choices=KINDS, default="logistic", help="logistic (default) or boosting")
    parser.add_argument("--seed", type=int, default=SEED, help=f"the train/held-out split's seed (default {SEED})")
    args = parser.parse_args(argv)
    try:
        metadata = train(args.registry, args.version, args.kind, seed=args.seed)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    m = metadata.metrics
    print(
        f"wrote {args.registry / metadata.version} ({metadata.kind}, model.joblib sha256 {metadata.sha256[:12]}…): "
        f"held-out ROC AUC {m.roc_auc:.4f}, Gini {m.gini:.4f}, KS {m.ks:.4f}, Brier {m.brier:.4f}",
        file=sys.stderr,
    )
    print(metadata.version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
