"""schemathesis against the gateway's own /openapi.json: no 500, no hang, no schema violation."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

from tests.e2e.reliability.conftest import FUZZ_KEY


def test_openapi_document_matches_the_validation_rules(rel_gateway: str) -> None:
    doc = httpx.get(rel_gateway.removesuffix("/v1") + "/openapi.json", timeout=10).json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["model"]["enum"] == ["demo"]
    assert body["properties"]["temperature"]["maximum"] == 2
    assert {"400", "401", "404", "413", "429", "503"} <= set(chat["responses"])


OPERATIONS = ["createChatCompletion", "createCompletion", "listModels", "retrieveModel"]


@pytest.mark.parametrize("operation_id", OPERATIONS)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_schema(rel_gateway: str, operation_id: str,
                                    mode: GenerationMode) -> None:
    # schemathesis' pytest plugin does not load under this pytest; its Python API does.
    schema = schemathesis.openapi.from_url(rel_gateway.removesuffix("/v1") + "/openapi.json")
    operation = schema.find_operation_by_id(operation_id)
    examples = 40 if operation_id.startswith("create") else 15

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def run(case: Any) -> None:
        case.call_and_validate(
            base_url=rel_gateway.removesuffix("/v1"),
            headers={"Authorization": f"Bearer {FUZZ_KEY}"}, timeout=30,
            excluded_checks=[checks.positive_data_acceptance])

    run()
