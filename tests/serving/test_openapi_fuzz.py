"""schemathesis against the running server's own /openapi.json: no request, valid or not, gets a 5xx, every
answer matches the published status codes, content types and bodies, and data the schema forbids is refused.

Valid requests (positive mode) run on a copy of the schema whose token counts are bounded (max_tokens ≤ 4, n ≤
2) to keep generation short; invalid ones (negative mode) run on the schema as published, so that every value it
forbids, token counts included, must be refused. Valid data may still be refused for what a schema cannot say (a
prompt longer than the context), so acceptance of all valid data is not checked.
"""

from __future__ import annotations

import copy

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from jaxllm import LLM
from jaxllm.serving import create_app
from tests.conftest import make_tiny_model
from tests.serving.conftest import RunningServer

pytestmark = pytest.mark.slow

EXAMPLES = 30  # per operation and mode
BOUNDS = {"max_tokens": 4, "max_completion_tokens": 4, "max_output_tokens": 4, "n": 2}


def _bounded(spec: dict) -> dict:
    spec = copy.deepcopy(spec)
    for schema in spec["components"]["schemas"].values():
        for name, top in BOUNDS.items():
            prop = schema.get("properties", {}).get(name)
            if prop is not None:
                for variant in prop.get("anyOf", [prop]):
                    if variant.get("type") == "integer":
                        variant["maximum"] = top
    return spec


def _run(url: str, spec: dict, mode, checks) -> None:
    schema = schemathesis.openapi.from_dict(spec)
    for result in schema.get_all_operations():
        operation = result.ok()
        if mode == schemathesis.GenerationMode.NEGATIVE and (operation.body is None or not len(operation.body)):
            continue  # nothing to get wrong: no body (a path parameter may be any string)

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            case.call_and_validate(base_url=url, checks=checks, timeout=120)

        check()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny random Llama (byte tokenizer, chat template): every request is answered in milliseconds."""
    folder = tmp_path_factory.mktemp("tiny-llama-fuzz")
    make_tiny_model(folder, "llama")
    llm = LLM(str(folder), max_num_seqs=4, max_model_len=256, progress=False)
    with RunningServer(create_app(llm, served_model_name="tiny", warmup=False)) as s:
        yield s


@pytest.fixture(scope="module")
def spec(server):
    published = httpx.get(server.url + "/openapi.json").json()
    assert published["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]["enum"] == ["tiny"]
    return published


def test_valid_requests_get_answers_that_match_the_schema(server, spec):
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    _run(server.url, _bounded(spec), schemathesis.GenerationMode.POSITIVE, checks)


def test_invalid_requests_are_refused_and_never_a_5xx(server, spec):
    checks = [not_a_server_error, status_code_conformance, negative_data_rejection, response_schema_conformance]
    _run(server.url, spec, schemathesis.GenerationMode.NEGATIVE, checks)
