"""The German Credit data set, read into the API's own vocabulary.

Training and the start-up self-check both read it from here, so the label map in
`german_credit_fields.json` is applied in exactly one place.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from service.schemas import APPLICANT_FIELDS, Applicant

DATA_DIR = Path(__file__).resolve().parent.parent / "artifacts" / "data"
CSV_NAME = "german_credit.csv"
FIELDS_NAME = "german_credit_fields.json"


class DatasetError(Exception):
    """The data set does not match its field map or the API schema."""


@dataclass(frozen=True)
class Dataset:
    applicants: list[Applicant]
    # 1 = bad (defaulted), 0 = good: the positive class is the one we predict.
    labels: list[int]


def load(data_dir: Path = DATA_DIR) -> Dataset:
    field_map = json.loads((data_dir / FIELDS_NAME).read_text())
    fields: dict[str, Any] = field_map["fields"]
    if tuple(fields) != APPLICANT_FIELDS:
        raise DatasetError(
            f"{FIELDS_NAME} lists fields {list(fields)}, but the API schema has {list(APPLICANT_FIELDS)}."
        )
    target = field_map["target"]
    excluded = set(field_map["excluded_columns"])
    applicants: list[Applicant] = []
    labels: list[int] = []
    with (data_dir / CSV_NAME).open(newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            raw: dict[str, Any] = {}
            for name, spec in fields.items():
                if spec["column"] in excluded:
                    raise DatasetError(f"Field {name!r} maps to protected column {spec['column']!r}.")
                cell = row[spec["column"]]
                if spec["values"] is None:
                    raw[name] = float(cell) if name == "credit_amount" else int(cell)
                elif cell in spec["values"]:
                    raw[name] = spec["values"][cell]
                else:
                    raise DatasetError(f"{CSV_NAME} line {line}: {spec['column']}={cell!r} is not in {FIELDS_NAME}.")
            try:
                applicants.append(msgspec.convert(raw, Applicant))
            except msgspec.ValidationError as exc:
                raise DatasetError(f"{CSV_NAME} line {line} is not a valid applicant: {exc}") from exc
            label = row[target["column"]]
            if label not in (target["bad"], target["good"]):
                raise DatasetError(f"{CSV_NAME} line {line}: unknown target {label!r}.")
            labels.append(1 if label == target["bad"] else 0)
    return Dataset(applicants=applicants, labels=labels)
