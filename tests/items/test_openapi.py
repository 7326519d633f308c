"""Every error an items route can answer is declared in OpenAPI, as the problem body."""

from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.anyio

PROBLEM = {"$ref": "#/components/schemas/Problem"}

# 400 on every items operation: a token sent in the URL (service.auth).
DECLARED = {
    ("/items", "get"): {"400", "422"},
    ("/items", "post"): {"400", "401", "409", "415", "422"},
    ("/items/scroll", "get"): {"400", "422"},
    ("/items/{item_id}", "get"): {"400", "404", "422"},
    ("/items/{item_id}", "patch"): {"400", "401", "404", "409", "412", "415", "422", "428"},
    ("/items/{item_id}", "delete"): {"400", "401", "404", "412", "422"},
}
# Any route: a body over the limit, a bug, the database away.
EVERY_ROUTE = {"413", "500", "503"}


@pytest.fixture
async def openapi(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    schema: dict[str, Any] = response.json()
    return schema


@pytest.mark.parametrize(("path", "method"), list(DECLARED))
async def test_each_route_declares_its_errors_as_problem_documents(
    openapi: dict[str, Any], path: str, method: str
) -> None:
    responses = openapi["paths"][path][method]["responses"]

    errors = {status for status in responses if status >= "400"}
    assert errors == DECLARED[(path, method)] | EVERY_ROUTE
    for status in errors:
        assert responses[status]["content"]["application/problem+json"]["schema"] == PROBLEM


async def test_fastapis_own_validation_error_body_is_not_advertised(
    openapi: dict[str, Any],
) -> None:
    assert "HTTPValidationError" not in openapi["components"]["schemas"]


async def test_list_parameters_are_documented_with_their_limits(
    openapi: dict[str, Any],
) -> None:
    parameters = {p["name"]: p for p in openapi["paths"]["/items"]["get"]["parameters"]}

    assert set(parameters) == {
        "q", "min_price", "max_price", "created_after", "created_before", "sort", "page",
        "size", "count", "prefer",
    }
    assert openapi["components"]["schemas"]["CountMode"]["enum"] == [
        "exact", "estimated", "none"
    ]
    assert parameters["size"]["schema"]["maximum"] == 100
    assert parameters["size"]["schema"]["default"] == 20
    sort_schema = openapi["components"]["schemas"]["ItemSort"]
    assert sort_schema["enum"] == [
        "id", "-id", "name", "-name", "price", "-price", "created_at", "-created_at"
    ]


def keys_of(document: Any) -> set[str]:
    """Every key of every object in `document`, at any depth (a property named like a
    keyword counts too: the items' have no such names)."""
    if isinstance(document, dict):
        return set(document).union(*(keys_of(value) for value in document.values()))
    if isinstance(document, list):
        return set().union(*(keys_of(value) for value in document))
    return set()


async def test_prices_are_described_in_json_schema_words(openapi: dict[str, Any]) -> None:
    # Generators and validators ignore pydantic's own words; JSON Schema's they enforce.
    assert not keys_of(openapi) & {"ge", "le", "max_digits", "decimal_places"}
    price = openapi["components"]["schemas"]["ItemCreate"]["properties"]["price"]
    number, text = price["anyOf"]
    assert (number["type"], number["minimum"], number["maximum"]) == ("number", 0, 9999999999.99)
    assert number["multipleOf"] == 0.01  # two decimal places
    assert text["type"] == "string"
    parameters = {p["name"]: p for p in openapi["paths"]["/items"]["get"]["parameters"]}
    assert {"type": "number", "minimum": 0, "maximum": 9999999999.99, "multipleOf": 0.01} in (
        parameters["min_price"]["schema"]["anyOf"]
    )


async def test_an_update_declares_only_description_nullable(
    client: httpx.AsyncClient, openapi: dict[str, Any]
) -> None:
    # The API refuses null for name and price (422): the schema must not offer it.
    properties = openapi["components"]["schemas"]["ItemUpdate"]["properties"]
    assert {"type": "null"} not in properties["name"].get("anyOf", [])
    assert {"type": "null"} not in properties["price"].get("anyOf", [])
    assert {"type": "null"} in properties["description"]["anyOf"]
    response = await client.patch("/items/1", json={"name": None}, headers={"If-Match": "*"})
    assert response.status_code == 422


async def test_patch_documents_the_if_match_header(openapi: dict[str, Any]) -> None:
    parameters = openapi["paths"]["/items/{item_id}"]["patch"]["parameters"]

    assert any(p["name"] == "If-Match" and p["in"] == "header" for p in parameters)


async def test_item_responses_declare_their_etag_and_location(
    openapi: dict[str, Any],
) -> None:
    """Clients (and client generators) learn from the document which headers carry the
    version to send back as If-Match, and the new item's URL."""
    paths = openapi["paths"]
    declared = {
        ("get", 200): paths["/items/{item_id}"]["get"]["responses"]["200"]["headers"],
        ("patch", 200): paths["/items/{item_id}"]["patch"]["responses"]["200"]["headers"],
        ("post", 201): paths["/items"]["post"]["responses"]["201"]["headers"],
    }
    assert all("ETag" in headers for headers in declared.values())
    assert "Location" in declared["post", 201]
    listed = paths["/items"]["get"]["responses"]["200"]["headers"]
    assert {"Preference-Applied", "Vary"} <= set(listed)


async def test_operation_ids_name_what_each_operation_does(openapi: dict[str, Any]) -> None:
    ids = {
        (path, method): operation["operationId"]
        for path, methods in openapi["paths"].items()
        if path.startswith("/items")
        for method, operation in methods.items()
    }

    assert ids == {
        ("/items", "get"): "list_items",
        ("/items", "post"): "create_item",
        ("/items/scroll", "get"): "scroll_items",
        ("/items/{item_id}", "get"): "get_item",
        ("/items/{item_id}", "patch"): "update_item",
        ("/items/{item_id}", "delete"): "delete_item",
    }


async def test_sort_values_carry_readable_enum_names(openapi: dict[str, Any]) -> None:
    sort = openapi["components"]["schemas"]["ItemSort"]

    assert dict(zip(sort["enum"], sort["x-enum-varnames"], strict=True)) == {
        "id": "ID_ASC", "-id": "ID_DESC", "name": "NAME_ASC", "-name": "NAME_DESC",
        "price": "PRICE_ASC", "-price": "PRICE_DESC",
        "created_at": "CREATED_AT_ASC", "-created_at": "CREATED_AT_DESC",
    }


async def test_writes_declare_the_bearer_scheme(openapi: dict[str, Any]) -> None:
    schemes = openapi["components"]["securitySchemes"]
    assert {scheme["type"] for scheme in schemes.values()} == {"http"}
    assert {scheme["scheme"] for scheme in schemes.values()} == {"bearer"}

    for path, method in (("/items", "post"), ("/items/{item_id}", "patch"),
                         ("/items/{item_id}", "delete")):
        security = openapi["paths"][path][method]["security"]
        assert {name for requirement in security for name in requirement} <= set(schemes)
        assert security


async def test_a_page_always_carries_total_and_pages_null_or_not(
    openapi: dict[str, Any]
) -> None:
    page = openapi["components"]["schemas"]["ItemPage"]
    assert {"items", "total", "pages", "page", "size", "total_is_exact"} <= set(page["required"])
    for name in ("total", "pages"):
        assert {"type": "null"} in page["properties"][name]["anyOf"]
