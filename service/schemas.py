"""The wire types of the API, as msgspec Structs.

Constraints live in the types, so validation and the JSON schema are one thing.
Decoders and encoders are built once here and reused by every request.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import msgspec

# -- applicant ---------------------------------------------------------------

CheckingAccount = Literal["none", "below_0", "0_to_200", "200_or_more"]
CreditHistory = Literal["no_credits", "all_paid_here", "paid_duly", "delayed", "critical"]
Purpose = Literal[
    "car_new",
    "car_used",
    "furniture",
    "radio_tv",
    "appliances",
    "repairs",
    "education",
    "retraining",
    "business",
    "other",
]
Savings = Literal["unknown", "below_100", "100_to_500", "500_to_1000", "1000_or_more"]
EmploymentSince = Literal["unemployed", "below_1", "1_to_4", "4_to_7", "7_or_more"]
OtherDebtors = Literal["none", "co_applicant", "guarantor"]
Property = Literal["real_estate", "savings_insurance", "car_other", "none"]
OtherInstallmentPlans = Literal["none", "bank", "stores"]
Housing = Literal["rent", "own", "free"]
Job = Literal["unemployed_nonresident", "unskilled_resident", "skilled", "highly_qualified"]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Base for request bodies: unknown fields are an error, not silently dropped."""


class Applicant(_Strict, frozen=True):
    checking_account: CheckingAccount
    duration_months: Annotated[int, msgspec.Meta(ge=1, le=120)]
    credit_history: CreditHistory
    purpose: Purpose
    credit_amount: Annotated[float, msgspec.Meta(gt=0, le=1_000_000)]
    savings: Savings
    employment_since: EmploymentSince
    installment_rate: Annotated[int, msgspec.Meta(ge=1, le=4)]
    other_debtors: OtherDebtors
    residence_since: Annotated[int, msgspec.Meta(ge=1, le=4)]
    property: Property
    age: Annotated[int, msgspec.Meta(ge=18, le=120)]
    other_installment_plans: OtherInstallmentPlans
    housing: Housing
    existing_credits: Annotated[int, msgspec.Meta(ge=0, le=50)]
    job: Job
    dependents: Annotated[int, msgspec.Meta(ge=0, le=20)]
    telephone: bool


# The lender's own id for an application: 1 to 64 printable ASCII characters.
Reference = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[\x20-\x7e]+$")]


class DecisionRequest(Applicant, frozen=True):
    """The body of POST /decisions (and each batch item): the applicant, and the lender's reference if any."""

    reference: Reference | None = None


class BatchRequest(_Strict, frozen=True):
    applicants: Annotated[list[DecisionRequest], msgspec.Meta(min_length=1, max_length=1000)]


# Annotated[...] is stripped here: only the base type tells categorical from numeric.
_APPLICANT_HINTS: dict[str, Any] = get_type_hints(Applicant)


def allowed_values(field: str) -> tuple[Any, ...] | None:
    """The values a categorical field accepts, or None for a numeric field."""
    hint = _APPLICANT_HINTS[field]
    if hint is bool:
        return (False, True)
    if get_origin(hint) is Literal:
        return get_args(hint)
    return None


APPLICANT_FIELDS: tuple[str, ...] = Applicant.__struct_fields__

# -- decision ----------------------------------------------------------------

RiskCategory = Literal["very_low", "low", "medium", "high", "very_high"]
RISK_CATEGORIES: tuple[str, ...] = get_args(RiskCategory)


class Reason(msgspec.Struct, frozen=True):
    feature: str
    contribution: float
    # A stable code and a sentence fit for an adverse-action notice (service/reasons.py).
    code: str | None = None
    statement: str | None = None


class Decision(msgspec.Struct, frozen=True):
    id: uuid.UUID
    decision: Literal["approve", "decline", "refer"]
    probability_of_default: float
    risk_category: RiskCategory
    score: int
    reasons: list[Reason]
    model_version: str
    created_at: dt.datetime
    # The lender's reference, as sent; null when none was (or once erased).
    reference: str | None = None


class BatchResponse(msgspec.Struct):
    decisions: list[Decision]


class SearchPage(msgspec.Struct, frozen=True):
    """A page of GET /decisions: newest first; `next` continues the listing, null on the last page."""

    decisions: list[Decision]
    next: str | None
    # The window searched, [since, until): without a reference, until stops a few seconds before now.
    since: dt.datetime
    until: dt.datetime


class Erasure(msgspec.Struct, frozen=True):
    """When the applicant's inputs (and the reference) were erased, and by whom: an admin key id, or retention."""

    erased_at: dt.datetime
    erased_by: str


class ErasedDecision(Erasure, frozen=True):
    id: uuid.UUID


class AuditedDecision(Decision, frozen=True):
    """GET /decisions/{id}?include=applicant: the decision, the inputs it was made from, and who asked."""

    # The applicant's fields as scored; null once erased.
    applicant: Applicant | None = None
    erasure: Erasure | None = None
    # The id of the API key the decision was made with (null: the API was open).
    key_id: str | None = None


class ProblemError(msgspec.Struct, frozen=True):
    path: str
    message: str


class Problem(msgspec.Struct, omit_defaults=True):
    """An RFC 9457 problem document."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[ProblemError] = []


# -- model lifecycle (admin) ---------------------------------------------------

Share = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class ChallengerAssignment(msgspec.Struct, frozen=True):
    version: str
    # The fraction of decisions the challenger also scores, off the response path.
    share: float


class Assignment(msgspec.Struct, frozen=True):
    """Which version is champion and which challenger, as stored in the system of record."""

    champion: str
    challenger: ChallengerAssignment | None
    changed_at: dt.datetime
    changed_by: str
    revision: int


class AssignmentChange(msgspec.Struct, frozen=True):
    """One entry of the assignment's history: what it was, what it became, who changed it and when."""

    revision: int
    action: str
    champion: str
    challenger: ChallengerAssignment | None
    previous_champion: str | None
    previous_challenger: ChallengerAssignment | None
    changed_at: dt.datetime
    changed_by: str


class ChallengerRequest(_Strict, frozen=True):
    """Body of PUT /admin/challenger: a version and its share, or `{"version": null}` to stop."""

    version: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] | None
    share: Share = 1.0


class WorkerModels(msgspec.Struct, frozen=True):
    """What one worker process has loaded, as it last reported it."""

    worker: str
    revision: int
    champion: str
    challenger: str | None
    loaded_at: dt.datetime
    seen_at: dt.datetime
    error: str | None = None


class VersionSummary(msgspec.Struct, frozen=True):
    """A version in the registry: what it is, how it did on held-out data, and its role now."""

    version: str
    kind: str | None
    trained_at: dt.datetime | None
    sha256: str | None
    # Held-out ROC AUC, Gini, KS and Brier.
    metrics: dict[str, float] | None
    role: Literal["champion", "challenger"] | None
    # Why the folder cannot be used (its metadata is missing or invalid), else null.
    error: str | None = None


class ModelsOverview(msgspec.Struct, frozen=True):
    """GET /admin/models: the registry, the assignment, and what every worker serves."""

    assignment: Assignment
    versions: list[VersionSummary]
    workers: list[WorkerModels]


class AssignmentHistory(msgspec.Struct, frozen=True):
    changes: list[AssignmentChange]


class ChallengerDecision(msgspec.Struct, frozen=True):
    """A challenger's verdict on a decision the champion made, recorded beside it."""

    decision_id: uuid.UUID
    model_version: str
    probability_of_default: float
    risk_category: str
    score: int
    decision: str
    scored_at: dt.datetime


class Comparison(msgspec.Struct, frozen=True):
    """Champion against challenger over a window, on the decisions both scored."""

    champion: str
    challenger: str
    window: dict[str, dt.datetime]
    count: int
    # approve_to_decline, decline_to_approve, and to and from refer: champion's decision first.
    flips: dict[str, int]
    approval_rate: dict[str, float | None]
    abs_delta_p: dict[str, float | None]
    score_correlation: float | None
    # Back-testing against recorded outcomes (AUC, Gini, KS of each): null while none are recorded.
    outcomes: dict[str, Any] | None = None


# -- outcomes and monitoring ---------------------------------------------------


class OutcomeRequest(_Strict, frozen=True):
    """Body of PUT /decisions/{id}/outcome: whether the borrower defaulted, and when that was known."""

    defaulted: bool
    # With its offset (an instant, not a wall-clock time).
    observed_at: Annotated[dt.datetime, msgspec.Meta(tz=True)]


class Outcome(msgspec.Struct, frozen=True):
    decision_id: uuid.UUID
    defaulted: bool
    observed_at: dt.datetime
    recorded_at: dt.datetime


class MonitoredFeature(msgspec.Struct, frozen=True):
    name: str
    # Characteristic stability against the training distribution; null when the model records none.
    psi: float | None
    status: Literal["stable", "watch", "act"] | None


class Monitoring(msgspec.Struct, frozen=True):
    """GET /monitoring: one model version over a window, computed in the system of record."""

    model_version: str
    window: dict[str, dt.datetime]
    # count, and the share of approve, decline and refer.
    decisions: dict[str, float | None]
    # mean, p50, p90, psi (against the training deciles) and its status.
    probability: dict[str, float | str | None]
    # p10, p50, p90 of the scorecard score.
    score: dict[str, float | None]
    features: list[MonitoredFeature]
    # count, default_rate, roc_auc, gini, ks, by_band; null when the window has no outcome.
    outcomes: dict[str, Any] | None
    # PSI from which a status is watch, and act.
    thresholds: dict[str, float]


# Built once: msgspec decoders and encoders are reusable and thread-safe.
applicant_decoder = msgspec.json.Decoder(DecisionRequest)
batch_decoder = msgspec.json.Decoder(BatchRequest)
reasons_decoder = msgspec.json.Decoder(list[Reason])
decision_decoder = msgspec.json.Decoder(Decision)
challenger_request_decoder = msgspec.json.Decoder(ChallengerRequest)
outcome_decoder = msgspec.json.Decoder(OutcomeRequest)
encoder = msgspec.json.Encoder()
