"""/docs and /redoc work with no internet access: every asset comes from the app itself.

The browser test drives a real headless Chromium (Debian's `chromium` + `chromium-driver`)
through the docs of a live server. It is skipped, loudly, when they are missing, and fails
instead under REQUIRE_BROWSER=1 (CI, where .ci/run installs them). Set
DOCS_SCREENSHOT=<file.png> to keep the screenshot of Swagger UI after "Try it out".
"""

import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.main import DOCS_URL, REDOC_URL

pytestmark = pytest.mark.anyio

ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


@pytest.mark.parametrize("page", [DOCS_URL, REDOC_URL])
async def test_docs_pages_load_every_asset_from_the_app(
    client: httpx.AsyncClient, page: str
) -> None:
    html = (await client.get(page)).text
    assets = ASSET.findall(html)

    assert assets, html
    for asset in assets:
        assert asset.startswith("/"), f"{page} loads {asset} from another host"
        response = await client.get(asset)
        assert response.status_code == 200, asset
        assert response.content


def browser_binaries() -> tuple[str, str] | None:
    """(chromium, chromedriver), or None when either is not installed."""
    browser = next(
        filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))),
        None,
    )
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def browser() -> Iterator[object]:
    binaries = browser_binaries()
    if binaries is None:
        message = (
            "no headless browser: install Debian's chromium and chromium-driver "
            "(apt-get install -y chromium chromium-driver) to run the docs browser test"
        )
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(f"REQUIRE_BROWSER=1: {message}")
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binaries[0]
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1600"
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=binaries[1]))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def resources_from_elsewhere(driver: object, origin: str) -> list[tuple[str, str]]:
    """(kind, URL) of everything the page fetched from another origin than `origin`."""
    entries: list[tuple[str, str]] = driver.execute_script(  # type: ignore[attr-defined]
        "return performance.getEntriesByType('resource').map(e => [e.initiatorType, e.name])"
    )
    return [(kind, url) for kind, url in entries if not url.startswith(origin)]


def test_swagger_ui_lists_the_items_operations_and_try_it_out_answers_200(
    browser: object, live_url: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    wait = WebDriverWait(driver, 30)  # type: ignore[arg-type]
    driver.get(live_url + DOCS_URL)  # type: ignore[attr-defined]

    operation = wait.until(
        shown.visibility_of_element_located((By.ID, "operations-items-list_items"))
    )
    for operation_id in ("create_item", "scroll_items", "get_item", "update_item"):
        assert driver.find_elements(By.CSS_SELECTOR, f"[id$='-{operation_id}']")  # type: ignore[attr-defined]
    write = driver.find_element(By.ID, "operations-items-create_item")  # type: ignore[attr-defined]
    assert write.find_elements(By.CSS_SELECTOR, "button.authorization__btn")  # the lock
    operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(shown.element_to_be_clickable((By.CSS_SELECTOR, ".try-out__btn"))).click()
    wait.until(shown.element_to_be_clickable((By.CSS_SELECTOR, ".execute"))).click()
    status = wait.until(
        shown.visibility_of_element_located(
            (By.CSS_SELECTOR, ".live-responses-table .response .response-col_status")
        )
    )

    assert status.text.strip() == "200"
    assert resources_from_elsewhere(driver, live_url) == []
    driver.execute_script(  # type: ignore[attr-defined]
        "arguments[0].scrollIntoView({block: 'center'})", status
    )
    shot = Path(os.environ.get("DOCS_SCREENSHOT") or tmp_path / "docs.png")
    driver.save_screenshot(str(shot))  # type: ignore[attr-defined]
    assert shot.stat().st_size > 10_000


def test_redoc_renders_the_items_operations(browser: object, live_url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    driver.get(live_url + REDOC_URL)  # type: ignore[attr-defined]

    WebDriverWait(driver, 30).until(  # type: ignore[arg-type]
        lambda d: "List items, a page at a time" in d.find_element(By.TAG_NAME, "body").text
    )
    body = driver.find_element(By.TAG_NAME, "body").text  # type: ignore[attr-defined]
    assert "Create an item" in body
    # ReDoc's bundle links its maker's logo from a CDN; offline the <img> hides itself
    # (onError). Nothing the page needs - a script, a style sheet, a font - is fetched.
    assert [kind for kind, _ in resources_from_elsewhere(driver, live_url)] in ([], ["img"])
