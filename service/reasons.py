"""Reason codes: what an adverse-action notice says for each field that pushed an applicant's risk up.

One table, one row per applicant field the model uses: a stable code and a plain
sentence in the manner of Regulation B's sample notice (Appendix C, form C-1),
written for the applicant, about the applicant's own situation. The codes never
change meaning; a new field gets a new code.

A field that is a prohibited basis under ECOA and Regulation B is never given as a
reason: `age` (the model uses it, as the data set's scorecard does, but an
applicant is never told "too young"); the next reason takes its place. Whether
the model should use age at all is the credit-risk team's question (Regulation B
allows it in an empirically derived system that does not score the elderly
down). The data set's other protected attributes (`personal_status_and_sex`,
`foreign_worker`) are not model inputs at all.
Reviewed for plain language: short, no jargon, no internal names, and for the
numeric fields a direction the shipped model's weights bear out (tests check it).
"""

from __future__ import annotations

from dataclasses import dataclass

from service.schemas import APPLICANT_FIELDS, Reason

# Beside schemas in the layering: it imports nothing but them, so the model (which gives reasons) and the
# stores (which complete old ones) both build on it.


@dataclass(frozen=True)
class ReasonCode:
    code: str
    statement: str


REASONS: dict[str, ReasonCode | None] = {
    "checking_account": ReasonCode("R01", "Checking account balance is low or overdrawn"),
    "duration_months": ReasonCode("R02", "Duration of credit is too long"),
    "credit_history": ReasonCode("R03", "Limited or unfavourable credit history"),
    "purpose": ReasonCode("R04", "Purpose of the credit"),
    "credit_amount": ReasonCode("R05", "Amount of credit requested is too high"),
    "savings": ReasonCode("R06", "Savings are low"),
    "employment_since": ReasonCode("R07", "Length of employment is too short"),
    "installment_rate": ReasonCode("R08", "Instalments are too high in relation to income"),
    "other_debtors": ReasonCode("R09", "No guarantor for the credit"),
    "residence_since": ReasonCode("R10", "Time at present address is too short"),
    "property": ReasonCode("R11", "Insufficient property or collateral"),
    # A prohibited basis under ECOA (Regulation B, 12 CFR 1002.2(z)): never a reason given to an applicant.
    "age": None,
    "other_installment_plans": ReasonCode("R12", "Instalment plans with other banks or stores"),
    "housing": ReasonCode("R13", "Housing situation"),
    "existing_credits": ReasonCode("R14", "Too many existing credits"),
    "job": ReasonCode("R15", "Type of employment"),
    "dependents": ReasonCode("R16", "Number of people you support financially"),
    "telephone": ReasonCode("R17", "No telephone on record"),
}

# Fields that may be given as a reason, in the model's order.
GIVEN: frozenset[str] = frozenset(name for name, reason in REASONS.items() if reason is not None)

assert tuple(REASONS) == APPLICANT_FIELDS, "every applicant field needs a row (None: never a reason)"


def reason(feature: str, contribution: float) -> Reason:
    """A reason as the API gives it: the field, its contribution (log-odds), its code and statement."""
    row = REASONS[feature]
    return Reason(
        feature=feature,
        contribution=round(contribution, 6),
        code=row.code if row is not None else None,
        statement=row.statement if row is not None else None,
    )


def completed(reasons: list[Reason]) -> list[Reason]:
    """Reasons stored before codes existed, given theirs (a code's meaning never changes), and never `age`.

    Such a decision may hold `age` among its reasons: it is dropped, not replaced (the stored
    reasons are all there is), so that decision shows one reason fewer.
    """
    if all(r.code is not None for r in reasons):
        return reasons
    return [r if r.code is not None else reason(r.feature, r.contribution) for r in reasons if r.feature in GIVEN]
