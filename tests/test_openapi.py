"""/openapi.json: a valid OpenAPI 3.1 document that says exactly what the decoders accept."""

from __future__ import annotations

from typing import Any

import pytest
from openapi_spec_validator import validate
from starlette.testclient import TestClient

from service.routes import ROUTES
from service.schemas import APPLICANT_FIELDS, allowed_values, applicant_decoder, encoder
from tests.test_decisions import assert_problem


@pytest.fixture
def document(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return dict(response.json())


def test_openapi_document_is_valid_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_openapi_lists_every_route(document: dict[str, Any]) -> None:
    documented = {(path, method.upper()) for path, item in document["paths"].items() for method in item}
    served = {
        (route.path.replace(":uuid", ""), method)
        for route in ROUTES
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert documented == served


def test_openapi_decision_routes_name_request_response_and_problem_schemas(document: dict[str, Any]) -> None:
    post = document["paths"]["/decisions"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/DecisionRequest"
    }
    assert post["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Decision"
    }
    for status in ("400", "415", "422", "503"):
        assert "application/problem+json" in post["responses"][status]["content"]
    example = post["requestBody"]["content"]["application/json"]["example"]
    applicant_decoder.decode(encoder.encode(example))  # the example is a valid applicant


def test_openapi_applicant_matches_the_decoder(document: dict[str, Any]) -> None:
    schema = document["components"]["schemas"]["DecisionRequest"]
    example = document["paths"]["/decisions"]["post"]["requestBody"]["content"]["application/json"]["example"]
    # The applicant's fields, all required, and the lender's optional reference.
    assert list(schema["properties"]) == [*APPLICANT_FIELDS, "reference"]
    assert schema["required"] == list(APPLICANT_FIELDS)
    assert schema["additionalProperties"] is False
    assert document["components"]["schemas"]["Applicant"]["required"] == list(APPLICANT_FIELDS)
    for value in ("x" * 64, " ~"):
        applicant_decoder.decode(encoder.encode({**example, "reference": value}))
    for value in ("", "x" * 65, "\u00e9"):
        with pytest.raises(Exception, match="Expected"):
            applicant_decoder.decode(encoder.encode({**example, "reference": value}))
    for field, spec in schema["properties"].items():
        if field == "reference":
            continue
        values = allowed_values(field)
        if "enum" in spec:
            assert sorted(spec["enum"]) == sorted(values or ())
            for value in spec["enum"]:
                applicant_decoder.decode(encoder.encode({**example, field: value}))
        elif spec.get("type") == "boolean":
            assert values == (False, True)
        else:
            # The documented bounds are exactly where the decoder starts to refuse.
            low = spec.get("minimum", spec.get("exclusiveMinimum"))
            high = spec["maximum"]
            step = 1 if spec["type"] == "integer" else 0.01
            accepts = (low + step if "exclusiveMinimum" in spec else low, high)
            refuses = (low if "exclusiveMinimum" in spec else low - step, high + step)
            for value in accepts:
                applicant_decoder.decode(encoder.encode({**example, field: value}))
            for value in refuses:
                with pytest.raises(Exception, match="Expected"):
                    applicant_decoder.decode(encoder.encode({**example, field: value}))


def test_openapi_batch_bounds_match_the_decoder(client: TestClient, document: dict[str, Any], applicant: dict) -> None:
    applicants = document["components"]["schemas"]["BatchRequest"]["properties"]["applicants"]
    assert (applicants["minItems"], applicants["maxItems"]) == (1, 1000)
    assert_problem(client.post("/decisions/batch", json={"applicants": [applicant] * 1001}), 422)
