"""POST /items and GET /items/{id}."""

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from tests.items.conftest import CreateItem
from tests.items.helpers import stored

pytestmark = pytest.mark.anyio


async def test_post_returns_201_with_the_item_its_location_and_etag(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    response = await client.post(
        "/items", json={"name": "Desk lamp", "description": "Warm light.", "price": "49.9"}
    )

    assert response.status_code == 201
    body = response.json()
    assert body["name"] == "Desk lamp"
    assert body["description"] == "Warm light."
    assert body["price"] == "49.90"
    assert body["version"] == 1
    assert response.headers["location"] == f"http://test/items/{body['id']}"
    assert response.headers["etag"] == f'"{body["id"]}-1"'
    assert stored(engine)[body["id"]]["price"] == Decimal("49.90")


async def test_post_strips_the_name_and_allows_no_description(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/items", json={"name": "  Teapot \n", "price": 12})

    assert response.status_code == 201
    assert response.json()["name"] == "Teapot"
    assert response.json()["description"] is None
    assert response.json()["price"] == "12.00"


async def test_timestamps_are_iso_8601_in_utc(client: httpx.AsyncClient) -> None:
    before = datetime.now(UTC)
    body = (await client.post("/items", json={"name": "Clock", "price": "5"})).json()

    created_at = datetime.fromisoformat(body["created_at"])
    assert body["created_at"].endswith("Z")
    assert created_at.utcoffset() is not None and created_at.utcoffset().total_seconds() == 0
    assert before <= created_at <= datetime.now(UTC)
    # A new item has not been changed since it was created.
    assert body["updated_at"] == body["created_at"]
    stored = (await client.get(f"/items/{body['id']}")).json()
    assert stored["updated_at"] == stored["created_at"] == body["created_at"]


@pytest.mark.parametrize(
    ("name", "duplicate"),
    [
        ("Desk lamp", "Desk lamp"),
        ("Desk lamp", "DESK LAMP"),
        ("Desk lamp", "desk Lamp"),
        ("Desk lamp", "  desk lamp "),
        # Every letter, not only A-Z, on SQLite as on PostgreSQL.
        ("Émile lamp", "émile LAMP"),
        ("Ça va", "ÇA VA"),
        ("Ωmega", "ωMEGA"),
        ("Straße", "STRAẞE"),
        # Composed or decomposed, the same letters are the same name.
        ("Café", "Cafe\u0301"),
        ("cafe\u0301 noir", "CAFÉ NOIR"),
    ],
)
async def test_post_with_a_taken_name_in_any_case_returns_409_and_stores_nothing(
    client: httpx.AsyncClient, engine: Engine, create_item: CreateItem, name: str,
    duplicate: str,
) -> None:
    await create_item(name, price="10.00")

    response = await client.post("/items", json={"name": duplicate, "price": "20.00"})

    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 409
    assert "exists already" in response.json()["detail"]
    assert [row["price"] for row in stored(engine).values()] == [Decimal("10.00")]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"price": "1.00"}, "name"),
        ({"name": "", "price": "1.00"}, "name"),
        ({"name": "   ", "price": "1.00"}, "name"),
        ({"name": "x" * 201, "price": "1.00"}, "name"),
        # Nothing visible; more than 200 characters once composed (U+0958 is two).
        ({"name": "\u200b", "price": "1.00"}, "name"),
        ({"name": " \u2060\ufeff\u2800 ", "price": "1.00"}, "name"),
        ({"name": "\u0958" * 200, "price": "1.00"}, "name"),
        # Text prices in ASCII digits, as JSON writes numbers.
        ({"name": "Lamp", "price": "1_000"}, "price"),
        ({"name": "Lamp", "price": "\uff11\uff12"}, "price"),
        ({"name": "Lamp", "price": "\u0663"}, "price"),
        ({"name": "Lamp", "price": "\u00a012"}, "price"),
        ({"name": "Lamp", "price": "12\u2009"}, "price"),
        ({"name": None, "price": "1.00"}, "name"),
        ({"name": "Lamp"}, "price"),
        ({"name": "Lamp", "price": "-0.01"}, "price"),
        ({"name": "Lamp", "price": "1.234"}, "price"),
        ({"name": "Lamp", "price": 1.234}, "price"),
        ({"name": "Lamp", "price": "NaN"}, "price"),
        ({"name": "Lamp", "price": "Infinity"}, "price"),
        ({"name": "Lamp", "price": "-Infinity"}, "price"),
        ({"name": "Lamp", "price": "cheap"}, "price"),
        ({"name": "Lamp", "price": "12345678901.00"}, "price"),
        ({"name": "Lamp", "price": None}, "price"),
        ({"name": "Lamp", "price": "1.00", "colour": "red"}, "colour"),
        ({"name": "Lamp", "price": "1.00", "description": 5}, "description"),
    ],
)
async def test_post_with_invalid_input_returns_422_naming_the_field_and_stores_nothing(
    client: httpx.AsyncClient, engine: Engine, body: dict[str, Any], field: str
) -> None:
    response = await client.post("/items", json=body)

    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422
    assert ["body", field] in [error["loc"] for error in problem["errors"]]
    assert stored(engine) == {}


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
async def test_post_with_a_non_finite_json_number_returns_422(
    client: httpx.AsyncClient, engine: Engine, literal: str
) -> None:
    response = await client.post(
        "/items",
        content=f'{{"name": "Lamp", "price": {literal}}}',
        headers={"content-type": "application/json"},
    )

    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["body", "price"]
    assert stored(engine) == {}


async def test_post_with_a_body_that_is_not_json_returns_422(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/items", content="{not json", headers={"content-type": "application/json"}
    )

    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("price", ["0", "0.00", "-0", 0, "9999999999.99", "1e2"])
async def test_post_accepts_every_price_from_zero_to_the_column_maximum(
    client: httpx.AsyncClient, price: Any
) -> None:
    response = await client.post("/items", json={"name": "Thing", "price": price})

    assert response.status_code == 201
    assert Decimal(response.json()["price"]) == Decimal(str(price))
    assert response.json()["price"] in ("0.00", "9999999999.99", "100.00")


async def test_a_decomposed_name_counts_its_characters_once_composed(
    client: httpx.AsyncClient,
) -> None:
    # 300 code points, 150 characters: "e" + a combining acute accent is one "é".
    created = await client.post("/items", json={"name": "e\u0301" * 150, "price": "1"})
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "é" * 150


async def test_a_name_is_stored_composed_and_found_either_way(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    created = await client.post("/items", json={"name": "Cafe\u0301 au lait", "price": "3"})
    assert created.status_code == 201
    assert created.json()["name"] == "Café au lait"
    assert [row["name"] for row in stored(engine).values()] == ["Café au lait"]
    for q in ("café", "cafe\u0301"):
        found = (await client.get("/items", params={"q": q})).json()["items"]
        assert [item["name"] for item in found] == ["Café au lait"]


async def test_a_200_character_name_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post("/items", json={"name": "é" * 200, "price": "1"})

    assert response.status_code == 201
    assert response.json()["name"] == "é" * 200


async def test_get_returns_the_item_with_its_etag(
    client: httpx.AsyncClient, create_item: CreateItem
) -> None:
    created = await create_item("Rug", price="120.00", description="Wool.")

    response = await client.get(f"/items/{created['id']}")

    assert response.status_code == 200
    assert response.json() == created
    assert response.headers["etag"] == f'"{created["id"]}-1"'


@pytest.mark.parametrize(
    "if_none_match",
    ['"{id}-1"', 'W/"{id}-1"', '"{id}-9", "{id}-1"', "*", ' "{id}-1" '],
)
async def test_get_with_the_current_etag_in_if_none_match_is_304_without_a_body(
    client: httpx.AsyncClient, create_item: CreateItem, if_none_match: str
) -> None:
    """A cache revalidating the item it holds (RFC 9110 13.1.2: weak comparison)."""
    created = await create_item("Rug")
    tag = if_none_match.replace("{id}", str(created["id"]))

    response = await client.get(f"/items/{created['id']}", headers={"If-None-Match": tag})

    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == f'"{created["id"]}-1"'
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    "if_none_match", ['"{id}-2"', '"{other}-1"', '"0{id}-1"', "{id}-1", '"{id}-01"', ""]
)
async def test_get_with_another_etag_in_if_none_match_is_the_item(
    client: httpx.AsyncClient, create_item: CreateItem, if_none_match: str
) -> None:
    created = await create_item("Rug")
    other = await create_item("Vase")
    tag = if_none_match.replace("{id}", str(created["id"])).replace("{other}", str(other["id"]))

    response = await client.get(f"/items/{created['id']}", headers={"If-None-Match": tag})

    assert response.status_code == 200
    assert response.json() == created


async def test_if_none_match_sent_on_two_lines_is_one_list(
    client: httpx.AsyncClient, create_item: CreateItem
) -> None:
    """RFC 9110 5.3: a list header on two lines is the lines joined - either order."""
    created = await create_item("Rug")
    current, other = f'"{created["id"]}-1"', f'"{created["id"]}-9"'
    for lines in ([current, other], [other, current]):
        response = await client.get(
            f"/items/{created['id']}", headers=[("If-None-Match", tag) for tag in lines]
        )
        assert response.status_code == 304, lines


async def test_an_etag_held_in_if_none_match_is_stale_after_an_update(
    client: httpx.AsyncClient, create_item: CreateItem
) -> None:
    created = await create_item("Rug")
    held = f'"{created["id"]}-1"'
    patched = await client.patch(
        f"/items/{created['id']}", json={"price": "2.00"}, headers={"If-Match": held}
    )
    assert patched.status_code == 200

    response = await client.get(f"/items/{created['id']}", headers={"If-None-Match": held})

    assert response.status_code == 200
    assert response.json()["price"] == "2.00"
    assert response.headers["etag"] == f'"{created["id"]}-2"'
    revalidated = await client.get(
        f"/items/{created['id']}", headers={"If-None-Match": response.headers["etag"]}
    )
    assert revalidated.status_code == 304


async def test_if_none_match_on_an_unknown_item_is_404(client: httpx.AsyncClient) -> None:
    response = await client.get("/items/424242", headers={"If-None-Match": "*"})

    assert response.status_code == 404


async def test_get_of_an_unknown_item_returns_404_problem(client: httpx.AsyncClient) -> None:
    response = await client.get("/items/424242")

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json() == {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "detail": "There is no item 424242.",
        "request_id": response.headers["x-request-id"],
    }


@pytest.mark.parametrize(
    "item_id",
    # Only ASCII digits name an item: pydantic alone reads "1_0" as 10 and "+1" as 1.
    ["abc", "0", "-1", str(2**63), "1_0", "+1", "1.0", "%201", "%EF%BC%91", "01"],
)
async def test_get_with_an_impossible_id_returns_422(
    client: httpx.AsyncClient, item_id: str
) -> None:
    response = await client.get(f"/items/{item_id}")

    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["path", "item_id"]


async def test_get_is_one_query(
    client: httpx.AsyncClient, create_item: CreateItem, assert_max_queries: Any
) -> None:
    created = await create_item("Vase")

    with assert_max_queries(1):
        response = await client.get(f"/items/{created['id']}")

    assert response.status_code == 200


async def test_the_response_body_is_plain_json(
    client: httpx.AsyncClient, create_item: CreateItem
) -> None:
    created = await create_item("Kettle", price="30")

    response = await client.get(f"/items/{created['id']}")

    assert response.headers["content-type"] == "application/json"
    assert set(json.loads(response.content)) == {
        "id", "name", "description", "price", "created_at", "updated_at", "version",
        "created_by", "updated_by",
    }
