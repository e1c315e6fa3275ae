"""The OpenAPI description: valid, served at /openapi.json, and a schemathesis run against a live server.

schemathesis generates requests from the document (valid and invalid) and checks that no answer is
a 5xx and that every answer's status, headers, content type and body match the document.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from dermal_fn.serving import shapes
from tests import hostile_fixtures as hf

SPEC_PATH = hf.REPO / "dermal_fn" / "static" / "openapi.json"


@pytest.fixture(scope="module")
def server(small_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[hf.ServerProcess]:
    env = {"MODEL_URI": str(small_bundle), "MAX_UPLOAD_MB": "1", "THREADS": "4", "LITERT_THREADS": "1"}
    log = tmp_path_factory.mktemp("openapi-server") / "server.log"
    with hf.running_server(env=env, log_path=log) as process:
        yield process
        assert "Traceback" not in process.log_text()


@pytest.fixture(scope="module")
def api_schema(server: hf.ServerProcess) -> Any:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_document_lists_every_route_and_error_code() -> None:
    spec = json.loads(SPEC_PATH.read_text())
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) == {"/predict", "/", "/health", "/memory", "/model", "/openapi.json"}
    predict = spec["paths"]["/predict"]["post"]
    assert set(predict["responses"]) == {"200", "400", "401", "405", "413", "415", "422", "503"}
    assert set(predict["requestBody"]["content"]) >= {
        "multipart/form-data",
        "application/json",
        "application/octet-stream",
        "image/jpeg",
    }
    assert {p["name"] for p in predict["parameters"]} == {
        "top_k",
        "class",
        "score",
        "gradcam",
        "assess",
        "overlay",
    }
    assert "Retry-After" in predict["responses"]["503"]["headers"]
    from dermal_fn.serving.http import ERROR_TABLE

    codes = set(spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"])
    assert {code for _, code in ERROR_TABLE.values()} <= codes


def test_document_is_served(server: hf.ServerProcess) -> None:
    status, headers, body = server.request("GET", "/openapi.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == json.loads(SPEC_PATH.read_text())


def test_schemathesis_accepts_the_document() -> None:
    schema = schemathesis.openapi.from_path(str(SPEC_PATH))
    operations = [op.ok() for op in schema.get_all_operations()]  # type: ignore[union-attr]
    assert {(op.method.upper(), op.path) for op in operations} == {
        ("POST", "/predict"),
        ("GET", "/"),
        ("POST", "/"),
        ("GET", "/health"),
        ("GET", "/memory"),
        ("GET", "/model"),
        ("GET", "/openapi.json"),
    }


# Random bytes that match `format: binary` are rarely a decodable photo, so "a schema-valid request
# must be accepted" does not hold for this API; every other built-in check runs.
_EXCLUDED = [positive_data_acceptance]

# GET routes take no input, so only schema-valid requests exist for them
CASES = [
    ("POST /predict", GenerationMode.POSITIVE),
    ("POST /predict", GenerationMode.NEGATIVE),
    ("POST /", GenerationMode.POSITIVE),
    ("POST /", GenerationMode.NEGATIVE),
    ("GET /", GenerationMode.POSITIVE),
    ("GET /health", GenerationMode.POSITIVE),
    ("GET /memory", GenerationMode.POSITIVE),
    ("GET /openapi.json", GenerationMode.POSITIVE),
]


@pytest.mark.parametrize(("label", "mode"), CASES)
def test_api_conforms_to_its_document(api_schema: Any, label: str, mode: GenerationMode) -> None:
    """No 5xx (503 excepted), and status, headers, content type and body as documented."""
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]
    examples = 30 if method == "POST" else 5

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        response = case.call_and_validate(excluded_checks=_EXCLUDED, timeout=30)
        assert response.status_code < 500 or response.status_code == 503

    check()


# --- the document against the typed shapes (dermal_fn/serving/shapes.py) -----------------------------


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _required(field: Any, *, total: bool) -> bool:
    """Whether a TypedDict's field is required (``get_type_hints`` keeps Required/NotRequired as written)."""
    origin = typing.get_origin(field)
    return True if origin is typing.Required else False if origin is typing.NotRequired else total


def _drift(spec: dict[str, Any], schema: dict[str, Any], hint: Any, where: str) -> list[str]:
    """Where the document's ``schema`` and the TypedDict ``hint`` disagree on fields or on which are required."""
    schema = _resolve(spec, schema)
    while typing.get_origin(hint) in (typing.NotRequired, typing.Required):
        hint = typing.get_args(hint)[0]
    if typing.is_typeddict(hint):
        fields = typing.get_type_hints(hint, include_extras=True)
        required = {name for name, field in fields.items() if _required(field, total=hint.__total__)}
        documented = schema.get("properties", {})
        found = []
        if set(documented) != set(fields):
            found.append(
                f"{where}: fields only typed {sorted(set(fields) - set(documented))}, "
                f"only documented {sorted(set(documented) - set(fields))}"
            )
        if set(schema.get("required", [])) != required:
            found.append(
                f"{where}: required typed {sorted(required)}, documented {sorted(schema.get('required', []))}"
            )
        for name in set(documented) & set(fields):
            found += _drift(spec, documented[name], fields[name], f"{where}.{name}")
        return found
    if typing.get_origin(hint) is list:
        return _drift(spec, schema.get("items", {}), typing.get_args(hint)[0], f"{where}[]")
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        shapes = [arg for arg in typing.get_args(hint) if typing.is_typeddict(arg)]
        return _drift(spec, schema, shapes[0], where) if shapes else []
    return []


@pytest.mark.parametrize("component", sorted(shapes.COMPONENTS))
def test_the_document_describes_the_typed_shapes(component: str) -> None:
    spec = json.loads(SPEC_PATH.read_text())
    schema = spec["components"]["schemas"][component]
    assert _drift(spec, schema, shapes.COMPONENTS[component], component) == []


def test_the_drift_check_sees_a_field_added_to_one_side() -> None:
    spec = json.loads(SPEC_PATH.read_text())
    schema = json.loads(json.dumps(spec["components"]["schemas"]["Memory"]))
    schema["properties"]["memory"]["properties"]["swap_mb"] = {"type": "number"}
    assert _drift(spec, schema, shapes.MemoryBody, "Memory") == [
        "Memory.memory: fields only typed [], only documented ['swap_mb']"
    ]
