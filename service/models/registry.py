"""The model registry: `MODEL_DIR/<version>/`, one folder per version, never edited once written.

A folder holds `metadata.json` (what the model is, and the sha256 of every other
file), `model.joblib` (the fitted scikit-learn pipeline), `checks.json` (reference
applicants with the probabilities the pipeline gave them at training) and, for a
logistic version, `scorecard.json` (the pipeline folded into weights).

Loading a logistic version reads the scorecard, never the pickle: it checks every
file's hash (the pickle's too, without unpickling it), then that the scorecard
reproduces the recorded probabilities to 1e-9. Nothing here imports numpy or
scikit-learn; a boosting version is unpickled only in its own process
(`service.models.boosting`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec

from service.models import metadata as meta
from service.models.metadata import CHECKS_NAME, METADATA_NAME, SCORECARD_NAME, Metadata, ModelError
from service.models.policy import Policy, scorecard_points
from service.models.scorecard import ScorecardFile, Scorer
from service.schemas import Applicant, Decision

MAX_PROBABILITY_DIFFERENCE = 1e-9
# Folder names are versions, and versions appear in URLs: no path tricks.
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class UnknownVersion(ModelError):
    """No folder of that version in the registry."""


class ChecksFile(msgspec.Struct):
    """`checks.json`: reference applicants and the probabilities the fitted pipeline gave them."""

    applicants: list[Applicant]
    probabilities: list[float]


@dataclass(frozen=True)
class Entry:
    """One folder of the registry, as scanned: its metadata, or why it cannot be read."""

    version: str
    path: Path
    metadata: Metadata | None
    error: str | None = None


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root

    def scan(self) -> list[Entry]:
        """Every version folder, oldest first (unreadable ones last, with their error)."""
        if not self.root.is_dir():
            raise ModelError(f"The model registry {self.root} does not exist; set MODEL_DIR or run `make train`.")
        entries = [self._entry(path) for path in sorted(self.root.iterdir()) if _is_version_folder(path)]
        return sorted(entries, key=lambda e: (e.metadata is None, e.metadata.trained_at if e.metadata else _EPOCH))

    def get(self, version: str) -> Entry:
        if not VERSION_PATTERN.fullmatch(version) or not (self.root / version).is_dir():
            raise UnknownVersion(f"There is no model version {version!r} in {self.root}.")
        return self._entry(self.root / version)

    def newest(self, kind: str = "logistic") -> Entry | None:
        usable = [e for e in self.scan() if e.metadata is not None and e.metadata.kind == kind]
        return usable[-1] if usable else None

    def _entry(self, path: Path) -> Entry:
        try:
            metadata, _ = read_metadata(path)
        except (ModelError, OSError) as exc:
            return Entry(path.name, path, None, str(exc))
        return Entry(path.name, path, metadata)


_EPOCH = dt.datetime.min.replace(tzinfo=dt.UTC)


def _is_version_folder(path: Path) -> bool:
    # Training writes into a hidden temporary folder and renames it when complete.
    return path.is_dir() and bool(VERSION_PATTERN.fullmatch(path.name))


def read_metadata(folder: Path) -> tuple[Metadata, bytes]:
    path = folder / METADATA_NAME
    if not path.is_file():
        raise ModelError(f"{path} does not exist: {folder.name} is not a complete model version.")
    raw = path.read_bytes()
    metadata = meta.decode(raw, str(path))
    if metadata.version != folder.name:
        raise ModelError(f"{path} says version {metadata.version!r}, but its folder is {folder.name!r}.")
    return metadata, raw


def read_verified(folder: Path, metadata: Metadata, name: str) -> bytes:
    """A file of the version, read once and checked against the sha256 its metadata records."""
    expected = metadata.sha256 if name == metadata.artifact else metadata.files.get(name)
    if expected is None:
        raise ModelError(f"{folder.name}/{METADATA_NAME} records no sha256 for {name}.")
    path = folder / name
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path} cannot be read: {exc.strerror or exc}.") from exc
    digest = hashlib.sha256(blob).hexdigest()
    if digest != expected:
        raise ModelError(
            f"{path} has sha256 {digest[:12]}…, but {METADATA_NAME} records {expected[:12]}…: "
            "the file was changed or belongs to another training run."
        )
    return blob


def verify_files(folder: Path, metadata: Metadata) -> dict[str, bytes]:
    """Every file the metadata lists, hash-checked (the pickle too, which is read but not unpickled)."""
    return {name: read_verified(folder, metadata, name) for name in (metadata.artifact, *metadata.files)}


def read_checks(folder: Path, raw: bytes) -> ChecksFile:
    try:
        checks = msgspec.json.decode(raw, type=ChecksFile)
    except msgspec.DecodeError as exc:
        raise ModelError(f"{folder / CHECKS_NAME} is not valid: {exc}.") from exc
    if not checks.applicants or len(checks.applicants) != len(checks.probabilities):
        raise ModelError(f"{folder / CHECKS_NAME} must pair each reference applicant with one probability.")
    return checks


class ScorecardModel:
    """A verified logistic version, ready to score: its metadata, folded weights and decision policy."""

    def __init__(self, metadata: Metadata, metadata_json: bytes, scorer: Scorer, policy: Policy, checked: float):
        self.metadata = metadata
        self.metadata_json = metadata_json
        self.version = metadata.version
        self.kind = metadata.kind
        self.scorer = scorer
        self.policy = policy
        # Largest |scorecard - recorded pipeline probability| over the reference applicants.
        self.max_difference = checked

    def decide(self, applicant: Applicant, decision_id: uuid.UUID, created_at: dt.datetime) -> Decision:
        probability, reasons = self.scorer.explain(applicant)
        policy = self.policy
        return Decision(
            id=decision_id,
            decision=policy.decision(probability),  # type: ignore[arg-type]
            probability_of_default=probability,
            risk_category=policy.risk_category(probability),  # type: ignore[arg-type]
            score=scorecard_points(probability),
            reasons=reasons,
            model_version=self.version,
            created_at=created_at,
            reference=getattr(applicant, "reference", None),
        )


def load_scorecard(entry: Entry, refer_band: tuple[float, float] | None) -> ScorecardModel:
    """Verify a logistic version (hashes, scorecard, self-check) and return it ready to serve."""
    folder = entry.path
    metadata, metadata_json = read_metadata(folder)
    if metadata.kind != "logistic":
        raise ModelError(
            f"{metadata.version} is a {metadata.kind} model: only a logistic model can be champion "
            "(it is served from its folded scorecard); a boosting model can be a challenger."
        )
    if SCORECARD_NAME not in metadata.files or CHECKS_NAME not in metadata.files:
        raise ModelError(f"{metadata.version} has no {SCORECARD_NAME} or {CHECKS_NAME}; retrain it.")
    files = verify_files(folder, metadata)
    try:
        card = msgspec.json.decode(files[SCORECARD_NAME], type=ScorecardFile)
        scorer = Scorer.from_file(card, str(folder / SCORECARD_NAME))
    except (msgspec.DecodeError, ValueError) as exc:
        raise ModelError(f"{folder / SCORECARD_NAME} cannot be used: {exc}.") from exc
    checks = read_checks(folder, files[CHECKS_NAME])
    worst = max(abs(scorer.probability(a) - p) for a, p in zip(checks.applicants, checks.probabilities, strict=True))
    if not worst <= MAX_PROBABILITY_DIFFERENCE:
        raise ModelError(
            f"The scorecard of {metadata.version} differs from its pipeline's recorded probabilities by {worst:.3g} "
            f"(allowed {MAX_PROBABILITY_DIFFERENCE:g}) on {len(checks.applicants)} reference applicants; "
            "refusing to serve it."
        )
    return ScorecardModel(metadata, metadata_json, scorer, Policy.of(metadata, refer_band), worst)
