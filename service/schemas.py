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


class BatchRequest(_Strict, frozen=True):
    applicants: Annotated[list[Applicant], msgspec.Meta(min_length=1, max_length=1000)]


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


class Decision(msgspec.Struct, frozen=True):
    id: uuid.UUID
    decision: Literal["approve", "decline"]
    probability_of_default: float
    risk_category: RiskCategory
    score: int
    reasons: list[Reason]
    model_version: str
    created_at: dt.datetime


class BatchResponse(msgspec.Struct):
    decisions: list[Decision]


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


# Built once: msgspec decoders and encoders are reusable and thread-safe.
applicant_decoder = msgspec.json.Decoder(Applicant)
batch_decoder = msgspec.json.Decoder(BatchRequest)
reasons_decoder = msgspec.json.Decoder(list[Reason])
decision_decoder = msgspec.json.Decoder(Decision)
encoder = msgspec.json.Encoder()
