"""Hostile input: bodies over the limit get 413; malformed JSON, wrong types, NaN and
Infinity prices, 10 kB names and control characters get 422 with field errors; SQL
metacharacters in `q` and `sort` are data, never SQL. Nothing is stored on any rejected
request. A request takes a database connection only once its whole body has arrived.
"""

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from service.config import Settings
from service.main import create_app
from tests.conftest import AUTH, http_scope
from tests.items.helpers import ids, insert_items, stored

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


def assert_field_errors(response: httpx.Response, *locs: list[Any]) -> list[dict[str, Any]]:
    """A 422 problem document whose field errors name exactly `locs` (as lists)."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert (body["status"], body["title"]) == (422, "Unprocessable Entity")
    errors: list[dict[str, Any]] = body["errors"]
    assert sorted(map(str, (e["loc"] for e in errors))) == sorted(map(str, locs)), errors
    return errors


@pytest.fixture
def lamp(engine: Engine) -> int:
    [item_id] = insert_items(engine, {"name": "Lamp", "price": Decimal("9.90")})
    return item_id


# -- 413 -------------------------------------------------------------------------------


async def test_body_over_one_mib_answers_413_and_stores_nothing(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    body = json.dumps({"name": "Lamp", "price": "1", "description": "x" * MiB}).encode()

    response = await client.post(
        "/items", content=body, headers={"content-type": "application/json"}
    )

    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 413
    assert stored(engine) == {}


async def test_body_just_under_one_mib_is_accepted(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    body = {"name": "Lamp", "price": "1", "description": "x" * (MiB - 100)}
    response = await client.post("/items", json=body)
    assert response.status_code == 201, response.text[:300]
    assert len(stored(engine)) == 1


async def test_chunked_body_over_the_limit_answers_413_and_stores_nothing(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"name": "Lamp", "price": "1", "description": "'
        for _ in range(20):
            yield b"x" * 64 * 1024
        yield b'"}'

    response = await client.post(
        "/items", content=chunks(), headers={"content-type": "application/json"}
    )

    assert response.status_code == 413, response.text[:300]
    assert response.json()["status"] == 413
    assert stored(engine) == {}


async def test_the_body_limit_is_configurable(
    settings: Settings, engine: Engine, lamp: int
) -> None:
    app = create_app(settings.model_copy(update={"max_body_bytes": 100}))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test", headers=AUTH
    ) as client:
        small = await client.patch(f"/items/{lamp}", json={"price": "2", "version": 1})
        large = await client.patch(
            f"/items/{lamp}", json={"description": "x" * 100, "version": 2}
        )

    assert small.status_code == 200, small.text
    assert large.status_code == 413
    assert stored(engine)[lamp]["description"] is None


# -- a slow upload holds no connection -------------------------------------------------


async def test_a_slow_upload_holds_no_connection_while_another_request_is_served(
    settings: Settings, engine: Engine
) -> None:
    # One connection slot on both databases: if the upload took it before its body was in,
    # the other request would wait for it and get 503 after the pool timeout.
    app = create_app(
        settings.model_copy(update={"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout": 1})
    )
    body = json.dumps({"name": "Slow lamp", "price": "9.90"}).encode()
    body_started = asyncio.Event()  # the first half is in; the app waits for the rest
    rest_of_body = asyncio.Event()
    answered = asyncio.Event()
    upload = [
        {"type": "http.request", "body": body[:10], "more_body": True},
        {"type": "http.request", "body": body[10:], "more_body": False},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if len(upload) == 1:  # the first half was taken: the client is slow
            body_started.set()
            await rest_of_body.wait()
        if upload:
            return upload.pop(0)
        await answered.wait()  # after the body, the client stays until it has its answer
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    scope = http_scope("POST", "/items", [
        (b"host", b"test"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"authorization", AUTH["Authorization"].encode()),
    ])
    slow = asyncio.create_task(app(scope, receive, send))
    try:
        await asyncio.wait_for(body_started.wait(), timeout=5)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test", headers=AUTH
        ) as client:
            quick = await asyncio.wait_for(
                client.post("/items", json={"name": "Quick rug", "price": "2"}), timeout=5
            )
            listed = await asyncio.wait_for(client.get("/items"), timeout=5)
        assert not slow.done()  # the upload is still under way
    finally:
        rest_of_body.set()
        await asyncio.wait_for(slow, timeout=5)

    assert quick.status_code == 201, quick.text
    assert [item["name"] for item in listed.json()["items"]] == ["Quick rug"]
    assert sent[0]["status"] == 201  # and the upload, once whole, is stored too
    assert sorted(row["name"] for row in stored(engine).values()) == ["Quick rug", "Slow lamp"]


# -- 422 -------------------------------------------------------------------------------

MALFORMED = [
    b'{"name": "Lamp", "price": ',
    b"{'name': 'Lamp', 'price': 1}",
    b'{"name": "Lamp", "price": 1,}',
    b"\xff\xfe{}",  # not UTF-8
    # What Python's own parser gives up on: nesting past its recursion limit, an integer
    # of more digits than it converts.
    b'{"name": "Lamp", "price": 1, "description": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"name": "Lamp", "price": ' + b"9" * 5000 + b"}",
]


@pytest.mark.parametrize("body", MALFORMED)
async def test_malformed_json_answers_422_and_stores_nothing(
    client: httpx.AsyncClient, engine: Engine, body: bytes
) -> None:
    response = await client.post(
        "/items", content=body, headers={"content-type": "application/json"}
    )

    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    [error] = response.json()["errors"]
    assert (error["loc"][0], error["type"]) == ("body", "json_invalid")  # loc[1]: the offset
    assert stored(engine) == {}


@pytest.mark.parametrize(
    ("body", "wrong"),
    [
        ({"name": 5, "price": "1"}, "name"),
        ({"name": ["Lamp"], "price": "1"}, "name"),
        ({"name": "Lamp", "price": True}, "price"),
        ({"name": "Lamp", "price": [1]}, "price"),
        ({"name": "Lamp", "price": {"amount": 1}}, "price"),
        ({"name": "Lamp", "price": "1", "description": 7}, "description"),
        ({"name": "Lamp", "price": "-1"}, "price"),
        ({"name": "Lamp", "price": "1.001"}, "price"),
        ({"name": "Lamp", "price": "1e20"}, "price"),
        ({"name": "Lamp", "price": "1", "id": 99}, "id"),
    ],
)
async def test_wrong_types_answer_422_with_the_field_and_store_nothing(
    client: httpx.AsyncClient, engine: Engine, body: dict[str, Any], wrong: str
) -> None:
    response = await client.post("/items", json=body)

    assert_field_errors(response, ["body", wrong])
    assert stored(engine) == {}


async def test_a_few_unknown_fields_are_each_named(client: httpx.AsyncClient, lamp: int) -> None:
    response = await client.post("/items", json={"name": "x", "price": 1, "colour": 1, "size": 2})

    assert_field_errors(response, ["body", "colour"], ["body", "size"])


@pytest.mark.parametrize(("known", "unknown"), [(0, 10), (3, 10), (0, 11), (3, 11)])
async def test_more_than_ten_unknown_fields_are_one_error(
    client: httpx.AsyncClient, known: int, unknown: int
) -> None:
    body = {**dict(list({"name": "x", "price": 1, "description": "d"}.items())[:known]),
            **{f"k{n}": n for n in range(unknown)}}

    response = await client.post("/items", json=body)

    errors = response.json()["errors"]
    named = [e for e in errors if e["type"] == "extra_forbidden"]
    assert len(named) == (unknown if unknown <= 10 else 1), errors


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_a_body_of_many_unknown_fields_is_one_error_not_one_per_field(
    client: httpx.AsyncClient, engine: Engine, lamp: int, method: str
) -> None:
    """90,000 made-up keys in 1 MiB: one error, a small answer (one error per key was an
    8 MB answer and seconds of the event loop's CPU), and nothing stored."""
    body = {"name": "x", "price": 1, **{f"k{n}": 1 for n in range(90_000)}}
    content = json.dumps(body, separators=(",", ":"))
    assert len(content) < MiB

    response = await client.request(
        method, "/items" if method == "POST" else f"/items/{lamp}", content=content,
        headers={"Content-Type": "application/json", "If-Match": "*"},
    )

    [error] = assert_field_errors(response, ["body"])
    assert error["type"] == "extra_forbidden"
    assert "90000 fields are not allowed" in error["msg"] and "'k0'" in error["msg"]
    assert len(response.content) < 2000
    assert [row["name"] for row in stored(engine).values()] == ["Lamp"]


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/xml"],
)
async def test_a_body_that_is_not_json_answers_415_and_stores_nothing(
    client: httpx.AsyncClient, engine: Engine, lamp: int, content_type: str | None
) -> None:
    body = json.dumps({"name": "Desk", "price": "2"})
    headers = {"If-Match": "*"} | ({"Content-Type": content_type} if content_type else {})
    for method, path in (("POST", "/items"), ("PATCH", f"/items/{lamp}")):
        response = await client.request(method, path, content=body, headers=headers)
        assert response.status_code == 415, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert "application/json" in response.json()["detail"]
    assert [row["name"] for row in stored(engine).values()] == ["Lamp"]


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "application/merge-patch+json"]
)
async def test_json_bodies_are_read_whatever_their_json_media_type(
    client: httpx.AsyncClient, engine: Engine, lamp: int, content_type: str
) -> None:
    response = await client.patch(
        f"/items/{lamp}",
        content=json.dumps({"price": "3"}),
        headers={"If-Match": "*", "Content-Type": content_type},
    )

    assert response.status_code == 200, response.text
    assert stored(engine)[lamp]["price"] == Decimal("3.00")


NOT_FINITE = [
    *(("number", value) for value in ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]),
    *(("string", f'"{value}"') for value in ["NaN", "-NaN", "sNaN", "Infinity", "-inf", "1e400"]),
]


@pytest.mark.parametrize(("kind", "value"), NOT_FINITE, ids=[f"{k}-{v}" for k, v in NOT_FINITE])
async def test_nan_and_infinite_prices_answer_422_and_store_nothing(
    client: httpx.AsyncClient, engine: Engine, lamp: int, kind: str, value: str
) -> None:
    headers = {"content-type": "application/json", "If-Match": "*"}
    create = await client.post(
        "/items", content=f'{{"name": "Rug", "price": {value}}}', headers=headers
    )
    update = await client.patch(f"/items/{lamp}", content=f'{{"price": {value}}}', headers=headers)

    assert_field_errors(create, ["body", "price"])
    assert_field_errors(update, ["body", "price"])
    assert stored(engine)[lamp]["price"] == Decimal("9.90")
    assert len(stored(engine)) == 1


async def test_a_10_kb_name_answers_422_and_stores_nothing(
    client: httpx.AsyncClient, engine: Engine, lamp: int
) -> None:
    name = "n" * 10_000

    create = await client.post("/items", json={"name": name, "price": "1"})
    update = await client.patch(f"/items/{lamp}", json={"name": name, "version": 1})

    [error] = assert_field_errors(create, ["body", "name"])
    assert error["type"] == "string_too_long"
    assert_field_errors(update, ["body", "name"])
    assert [row["name"] for row in stored(engine).values()] == ["Lamp"]


CONTROL = ["\x00", "\x01", "\x08", "\x1b[31m", "\x7f", "\u2028"]


@pytest.mark.parametrize("control", CONTROL, ids=[repr(c) for c in CONTROL])
async def test_control_characters_in_a_name_answer_422_and_store_nothing(
    client: httpx.AsyncClient, engine: Engine, lamp: int, control: str
) -> None:
    name = f"Desk{control}lamp"

    create = await client.post("/items", json={"name": name, "price": "1"})
    update = await client.patch(f"/items/{lamp}", json={"name": name, "version": 1})

    assert_field_errors(create, ["body", "name"])
    assert_field_errors(update, ["body", "name"])
    assert [row["name"] for row in stored(engine).values()] == ["Lamp"]


async def test_control_characters_in_a_description_answer_422_but_line_breaks_are_text(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    refused = await client.post(
        "/items", json={"name": "Rug", "price": "1", "description": "Wool\x00\x07"}
    )
    accepted = await client.post(
        "/items", json={"name": "Mat", "price": "1", "description": "Wool.\n\tHand-made.\r\n"}
    )

    assert_field_errors(refused, ["body", "description"])
    assert accepted.status_code == 201, accepted.text
    assert [row["name"] for row in stored(engine).values()] == ["Mat"]


@pytest.mark.parametrize("path", ["/items", "/items/scroll"])
async def test_control_characters_in_q_answer_422(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path, params={"q": "lamp\x00"})
    assert_field_errors(response, ["query", "q"])


# -- SQL metacharacters are data -------------------------------------------------------

NAMES = [
    "O'Brien's lamp", "100% wool rug", "under_score", 'say "hi"', "back\\slash", "either/or",
    "plain",
]
METACHARACTERS = [
    ("'", ["O'Brien's lamp"]),
    ("%", ["100% wool rug"]),
    ("_", ["under_score"]),
    ('"', ['say "hi"']),
    ("\\", ["back\\slash"]),
    # `/` is the escape character of the LIKE pattern: escaped itself, and never escaping %.
    ("/", ["either/or"]),
    ("r/o", ["either/or"]),
    ("/%", []),
    ("/_", []),
    ("'; DROP TABLE items; --", []),
    ("' OR '1'='1", []),
    ("%' OR 1=1 --", []),
    ("lamp' UNION SELECT * FROM items --", []),
]


@pytest.mark.parametrize(("q", "expected"), METACHARACTERS)
@pytest.mark.parametrize("path", ["/items", "/items/scroll"])
async def test_sql_metacharacters_in_q_are_searched_for_literally(
    client: httpx.AsyncClient, engine: Engine, path: str, q: str, expected: list[str]
) -> None:
    rows = insert_items(engine, *({"name": n, "price": Decimal("1")} for n in NAMES))
    by_id = dict(zip(rows, NAMES, strict=True))

    response = await client.get(path, params={"q": q})

    assert [by_id[i] for i in ids(response)] == expected
    assert sorted(row["name"] for row in stored(engine).values()) == sorted(NAMES)


@pytest.mark.parametrize(
    "sort",
    ["name; DROP TABLE items", "name DESC", "(SELECT 1)", "id--", "price,name", "1", "NAME"],
)
@pytest.mark.parametrize("path", ["/items", "/items/scroll"])
async def test_sql_in_sort_answers_422_and_touches_nothing(
    client: httpx.AsyncClient, engine: Engine, lamp: int, path: str, sort: str
) -> None:
    response = await client.get(path, params={"sort": sort})

    assert_field_errors(response, ["query", "sort"])
    assert [row["name"] for row in stored(engine).values()] == ["Lamp"]
