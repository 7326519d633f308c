"""A Python client generated from the live /openapi.json (openapi-python-client) works
against the app: its method and enum names read well, and a whole session of an API
consumer - create, get, pages, scroll, update with If-Match, a 412, delete - goes through
the generated models."""

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from tests.conftest import TEST_TOKEN

PACKAGE = "items_client"


@pytest.fixture
def generated(live_url: str, tmp_path: Path) -> Iterator[ModuleType]:
    """The client package generated from the server's own /openapi.json, imported."""
    spec = tmp_path / "openapi.json"
    spec.write_bytes(httpx.get(f"{live_url}/openapi.json").content)
    config = tmp_path / "config.yml"
    config.write_text("post_hooks: []\n")  # no formatter run: only the code matters here
    generator = Path(sys.executable).with_name("openapi-python-client")
    result = subprocess.run(
        [
            str(generator), "generate", "--path", str(spec), "--meta", "none",
            "--output-path", str(tmp_path / PACKAGE), "--config", str(config),
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stdout, result.stdout
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [name for name in sys.modules if name.partition(".")[0] == PACKAGE]:
            del sys.modules[name]


def module(package: ModuleType, name: str) -> ModuleType:
    return importlib.import_module(f"{package.__name__}.{name}")


def test_operations_and_sort_values_get_readable_names(generated: ModuleType) -> None:
    api = f"{generated.__name__}.api.items"
    for operation in (
        "list_items", "scroll_items", "get_item", "create_item", "update_item", "delete_item"
    ):
        assert hasattr(importlib.import_module(f"{api}.{operation}"), "sync_detailed")
    sort = module(generated, "models").ItemSort

    assert sort.ID_DESC.value == "-id"
    assert sort.CREATED_AT_ASC.value == "created_at"


def test_a_consumer_session_through_the_generated_client(
    generated: ModuleType, live_url: str
) -> None:
    api = f"{generated.__name__}.api.items"
    create_item, get_item, list_items, scroll_items, update_item, delete_item = (
        importlib.import_module(f"{api}.{name}")
        for name in (
            "create_item", "get_item", "list_items", "scroll_items", "update_item",
            "delete_item",
        )
    )
    models = module(generated, "models")
    client = generated.AuthenticatedClient(base_url=live_url, token=TEST_TOKEN)

    created = [
        create_item.sync_detailed(
            client=client, body=models.ItemCreate(name=f"client item {n:02}", price="1.50")
        )
        for n in range(25)
    ]
    assert {response.status_code for response in created} == {201}
    first = created[0].parsed
    assert isinstance(first, models.ItemOut) and first.name == "client item 00"

    fetched = get_item.sync_detailed(first.id, client=client)
    assert isinstance(fetched.parsed, models.ItemOut) and fetched.parsed.price == "1.50"
    etag = fetched.headers["etag"]
    assert etag == f'"{first.id}-{first.version}"'

    pages = [
        list_items.sync_detailed(client=client, page=number, size=10, sort=models.ItemSort.ID_ASC)
        for number in (1, 2, 3)
    ]
    assert all(isinstance(page.parsed, models.ItemPage) for page in pages)
    assert [len(page.parsed.items) for page in pages] == [10, 10, 5]
    assert pages[0].parsed.total == 25 and pages[0].parsed.pages == 3
    # Without a count, total and pages are null - always sent, so never "unset".
    uncounted = list_items.sync_detailed(client=client, size=10, count=models.CountMode.NONE)
    assert isinstance(uncounted.parsed, models.ItemPage)
    assert (uncounted.parsed.total, uncounted.parsed.pages) == (None, None)

    names: list[str] = []
    cursor = None
    while True:
        scroll = scroll_items.sync_detailed(
            client=client, size=7, sort=models.ItemSort.NAME_DESC,
            **({"cursor": cursor} if cursor else {}),
        ).parsed
        assert isinstance(scroll, models.ItemScroll)
        names += [item.name for item in scroll.items]
        if scroll.next_page is None:
            break
        cursor = scroll.next_page
    assert names == [f"client item {n:02}" for n in reversed(range(25))]

    updated = update_item.sync_detailed(
        first.id, client=client, body=models.ItemUpdate(price="2.00"), if_match=etag
    )
    assert updated.status_code == 200
    assert isinstance(updated.parsed, models.ItemOut)
    assert (updated.parsed.price, updated.parsed.version) == ("2.00", first.version + 1)

    stale = update_item.sync_detailed(
        first.id, client=client, body=models.ItemUpdate(price="3.00"), if_match=etag
    )
    assert stale.status_code == 412
    assert isinstance(stale.parsed, models.Problem) and stale.parsed.status == 412

    deleted = delete_item.sync_detailed(first.id, client=client)
    assert deleted.status_code == 204
    gone = get_item.sync_detailed(first.id, client=client)
    assert gone.status_code == 404 and isinstance(gone.parsed, models.Problem)
