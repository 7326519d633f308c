"""HEAD answers what GET would, without the body; a 405 names every method of the path."""

import httpx
import pytest

from tests.items.conftest import CreateItem

pytestmark = pytest.mark.anyio


async def test_head_answers_every_get_route_with_its_headers_and_no_body(
    client: httpx.AsyncClient, create_item: CreateItem
) -> None:
    item = await create_item("Lamp")
    for path in (f"/items/{item['id']}", "/items?size=5", "/items/scroll", "/health/live",
                 "/openapi.json"):
        got = await client.get(path)
        head = await client.head(path)
        assert (head.status_code, head.content) == (200, b""), path
        for header in ("content-type", "content-length", "etag"):
            assert head.headers.get(header) == got.headers.get(header), (path, header)


async def test_head_of_a_missing_item_is_404_without_a_body(client: httpx.AsyncClient) -> None:
    head = await client.head("/items/424242")
    assert (head.status_code, head.content) == (404, b"")
    assert head.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/items/1", "DELETE, GET, HEAD, PATCH"),
        ("/items", "GET, HEAD, POST"),
        ("/items/scroll", "GET, HEAD"),
        ("/health/live", "GET, HEAD"),
        ("/static-offline-docs/swagger-ui.css", "GET, HEAD"),
    ],
)
async def test_a_method_the_path_does_not_answer_is_405_naming_every_one_it_does(
    client: httpx.AsyncClient, path: str, allow: str
) -> None:
    response = await client.put(path, json={})
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.headers["content-type"] == "application/problem+json"
