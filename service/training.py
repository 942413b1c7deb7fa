"""Train the credit model and write its artifact and metadata (`make train`).

Deterministic: a fixed seed, a stratified split and lbfgs give the same weights,
the same artifact bytes and the same held-out metrics on every run with the
pinned libraries.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import platform
import sys
from pathlib import Path

import joblib
import msgspec
import numpy as np
import sklearn
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from service import dataset, model
from service.schemas import APPLICANT_FIELDS, RISK_CATEGORIES, Applicant, allowed_values

NAME = "german-credit-lr"
SEED = 42
HELD_OUT_FRACTION = 0.3
# The data set's cost matrix: approving a bad applicant costs 5, declining a good
# one costs 1, so declining pays once P(bad) >= 1 / (1 + 5).
CUTOFF = 1 / 6
# Upper bounds of the risk bands; "low" ends at the cut-off, so very_low and low
# are exactly the approvals.
RISK_BOUNDS = (0.05, CUTOFF, 0.35, 0.60, 1.0)
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "artifacts" / "classifier.joblib"


def build_pipeline() -> Pipeline:
    categorical = [APPLICANT_FIELDS.index(f) for f in model.CATEGORICAL_FIELDS]
    numeric = [APPLICANT_FIELDS.index(f) for f in model.NUMERIC_FIELDS]
    features = ColumnTransformer(
        [
            (
                "categorical",
                # Categories come from the API schema, not from the data, so a value
                # the training rows never show still has a (zero) weight.
                OneHotEncoder(categories=[list(allowed_values(f) or ()) for f in model.CATEGORICAL_FIELDS]),
                categorical,
            ),
            ("numeric", StandardScaler(), numeric),
        ],
        sparse_threshold=0.0,
    )
    return Pipeline([("features", features), ("regression", LogisticRegression(C=1.0, max_iter=5000))])


def feature_info(train: list[Applicant]) -> list[model.FeatureInfo]:
    bounds = {f.name: f.type for f in msgspec.inspect.type_info(Applicant).fields}  # type: ignore[attr-defined]
    infos = []
    for name in APPLICANT_FIELDS:
        column = [getattr(a, name) for a in train]
        values = allowed_values(name)
        if values is not None:
            infos.append(
                model.FeatureInfo(
                    name=name,
                    kind="categorical",
                    values=list(values),
                    training_frequencies=[column.count(v) / len(column) for v in values],
                )
            )
        else:
            kind = bounds[name]
            infos.append(
                model.FeatureInfo(
                    name=name,
                    kind="numeric",
                    minimum=kind.ge if kind.ge is not None else kind.gt,
                    maximum=kind.le,
                    training_mean=float(np.mean(column)),
                )
            )
    return infos


def held_out_metrics(labels: np.ndarray, probabilities: np.ndarray) -> model.Metrics:
    auc = float(roc_auc_score(labels, probabilities))
    fpr, tpr, _ = roc_curve(labels, probabilities)
    return model.Metrics(
        roc_auc=auc,
        gini=2 * auc - 1,
        ks=float(np.max(tpr - fpr)),
        brier=float(brier_score_loss(labels, probabilities)),
    )


def train(output: Path = DEFAULT_OUTPUT, data_dir: Path = dataset.DATA_DIR) -> model.Metadata:
    data = dataset.load(data_dir)
    indices = np.arange(len(data.applicants))
    labels = np.array(data.labels)
    train_idx, test_idx = train_test_split(indices, test_size=HELD_OUT_FRACTION, stratify=labels, random_state=SEED)
    train_rows = [data.applicants[i] for i in train_idx]
    test_rows = [data.applicants[i] for i in test_idx]
    pipeline = build_pipeline()
    pipeline.fit(model.to_matrix(train_rows), labels[train_idx])
    metrics = held_out_metrics(labels[test_idx], pipeline.predict_proba(model.to_matrix(test_rows))[:, 1])

    buffer = io.BytesIO()
    joblib.dump(pipeline, buffer)
    blob = buffer.getvalue()
    field_map = json.loads((data_dir / dataset.FIELDS_NAME).read_text())
    now = dt.datetime.now(dt.UTC)
    metadata = model.Metadata(
        name=NAME,
        version=f"{NAME}-{now:%Y.%m.%d}",
        trained_at=now,
        libraries={
            "python": platform.python_version(),
            "scikit-learn": sklearn.__version__,
            "numpy": np.__version__,
            "joblib": joblib.__version__,
        },
        artifact=output.name,
        sha256=hashlib.sha256(blob).hexdigest(),
        features=feature_info(train_rows),
        cutoff=CUTOFF,
        risk_bands=[
            model.RiskBand(category=c, upper_bound=b) for c, b in zip(RISK_CATEGORIES, RISK_BOUNDS, strict=True)
        ],
        metrics=metrics,
        training=model.TrainingInfo(
            data=f"{data_dir.name}/{dataset.CSV_NAME}",
            rows=len(indices),
            train_rows=len(train_idx),
            held_out_rows=len(test_idx),
            held_out_fraction=HELD_OUT_FRACTION,
            seed=SEED,
            excluded_columns=field_map["excluded_columns"],
            positive_class="bad",
        ),
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    # Write both files beside their final names, then rename: a crash mid-write
    # never leaves an artifact whose hash disagrees with its metadata.
    tmp_model = output.with_suffix(".tmp")
    tmp_meta = model.metadata_path(output).with_suffix(".tmp")
    tmp_model.write_bytes(blob)
    tmp_meta.write_bytes(msgspec.json.format(msgspec.json.encode(metadata), indent=2) + b"\n")
    tmp_model.replace(output)
    tmp_meta.replace(model.metadata_path(output))
    return metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the artifact")
    args = parser.parse_args(argv)
    metadata = train(args.output)
    m = metadata.metrics
    print(
        f"wrote {args.output} (sha256 {metadata.sha256[:12]}…), version {metadata.version}: "
        f"held-out ROC AUC {m.roc_auc:.4f}, Gini {m.gini:.4f}, KS {m.ks:.4f}, Brier {m.brier:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
