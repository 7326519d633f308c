"""HTTP routes of items: parse the request, call `service.items.service`, shape the response.

Concurrency: every item response carries `ETag: "<id>-<version>"`. An update (PATCH) must
say which version it was made against - `If-Match: "<id>-<version>"` or `"version": n` in
the body, else 428; a stale one gets 412 and changes nothing. `If-Match: *` updates
whatever the current version is. DELETE honours If-Match when sent and needs none.

Reads and writes live on two routers, joined into `router` at the end of the module, each
declaring the scope it needs (`service.auth.Requirement`): writes `items:write` always,
reads `items:read` when READ_REQUIRES_TOKEN=true.
"""

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from pydantic import BeforeValidator, Field

from service.auth import Requirement
from service.config import Settings
from service.items import service
from service.items.models import Item
from service.items.schemas import (
    SORT_HELP,
    CountMode,
    ItemCreate,
    ItemFilters,
    ItemOut,
    ItemPage,
    ItemScroll,
    ItemSort,
    ItemUpdate,
    PageParams,
    ScrollQuery,
    ascii_digits,
)
from service.items.service import ANY_VERSION, VersionMatch
from service.problems import problem_responses

READ = "items:read"
WRITE = "items:write"

reads = APIRouter(
    prefix="/items", tags=["items"], dependencies=[Depends(Requirement(READ, reads=True))]
)
writes = APIRouter(prefix="/items", tags=["items"], dependencies=[Depends(Requirement(WRITE))])

# The bounds before the digits check (`UrlInt`), so that OpenAPI has them as JSON Schema's
# minimum and maximum.
ItemId = Annotated[
    int,
    Field(ge=1, le=2**63 - 1),
    BeforeValidator(ascii_digits),
    Path(description="The item's id."),
]
def _if_match(
    request: Request,
    if_match: Annotated[
        str | None,
        Header(
            alias="If-Match",
            description='The ETag you read, e.g. "17-3" (several, comma-separated, or *).',
        ),
    ] = None,
) -> str | None:
    return _every_line(request, b"if-match")


def _if_none_match(
    request: Request,
    if_none_match: Annotated[
        str | None,
        Header(
            alias="If-None-Match",
            description='The ETag you hold, e.g. "17-3" (several, comma-separated, or *): '
            "304 Not Modified, without a body, while the item is still at that version.",
        ),
    ] = None,
) -> str | None:
    return _every_line(request, b"if-none-match")


def _every_line(request: Request, name: bytes) -> str | None:
    """A list header sent on several lines, as one (RFC 9110 5.3: the lines joined with
    commas); FastAPI's `Header` gives the last line only."""
    lines = [value for key, value in request.scope["headers"] if key == name]
    return b", ".join(lines).decode("latin-1") if lines else None


# The parameters declare the headers in OpenAPI; the dependencies read every line of them.
IfMatch = Annotated[str | None, Depends(_if_match)]
IfNoneMatch = Annotated[str | None, Depends(_if_none_match)]
Filters = Annotated[ItemFilters, Query()]
Sort = Annotated[ItemSort, Query(description=SORT_HELP)]

# As `etag()` writes them: ASCII digits without leading zeros ("047-001" is not "47-1": an
# entity tag is compared as a string).
_ENTITY_TAG = re.compile(r'"([1-9][0-9]*)-([1-9][0-9]*)"')


def etag(item: Item) -> str:
    """The strong ETag of the item's current representation: `"<id>-<version>"`."""
    return f'"{item.id}-{item.version}"'


def version_match(item_id: int, if_match: str | None) -> VersionMatch | None:
    """The versions of item `item_id` that an If-Match header accepts; None without one.

    Tags of other items, weak tags and unparsable ones accept nothing (RFC 9110: If-Match
    compares strongly), so they lead to 412, not to an update.
    """
    if if_match is None:
        return None
    if if_match.strip() == "*":
        return ANY_VERSION
    versions = set()
    for tag in if_match.split(","):
        match = _ENTITY_TAG.fullmatch(tag.strip())
        if match and int(match[1]) == item_id:
            versions.add(int(match[2]))
    return VersionMatch(frozenset(versions))


def still_current(item: Item, if_none_match: str | None) -> bool:
    """Whether an If-None-Match header names the item's current version. RFC 9110 13.1.2
    compares weakly: `W/"17-3"` names version 3 as `"17-3"` does; `*` names any."""
    if if_none_match is None:
        return False
    if if_none_match.strip() == "*":
        return True
    current = etag(item)
    return any(tag.strip().removeprefix("W/") == current for tag in if_none_match.split(","))


def _item_response(response: Response, item: Item) -> ItemOut:
    response.headers["ETag"] = etag(item)
    return ItemOut.model_validate(item)


@reads.get(
    "",
    response_model=ItemPage,
    summary="List items, a page at a time",
    responses={
        200: {
            "headers": {
                "Preference-Applied": {
                    "description": "`count=...` when the `Prefer` header chose the count "
                    "mode (RFC 7240).",
                    "schema": {"type": "string"},
                },
                "Vary": {
                    "description": "`Prefer`: the body depends on it.",
                    "schema": {"type": "string"},
                },
            }
        },
        **problem_responses(422),
    },
)
async def list_items(
    filters: Filters,
    request: Request,
    response: Response,
    sort: Sort = ItemSort.id_asc,
    count: Annotated[
        CountMode | None,
        Query(
            description="How to count `total`: `exact` (every match; slow on big tables), "
            "`estimated` (exact up to a threshold, 10,000 by default, then an estimate; "
            "`total_is_exact` says which) or `none` (no total). Default: the request's "
            "`Prefer: count=...` header, else `estimated`."
        ),
    ] = None,
    prefer: Annotated[
        str | None,
        Header(description="RFC 7240 preferences; `count=exact|estimated|none` is honoured."),
    ] = None,
    *,
    paging: Annotated[PageParams, Query()],
) -> Any:
    """Numbered pages with a total. For reading far into a large list, `GET /items/scroll`
    stays fast at any depth."""
    mode = count
    # The body depends on the Prefer header: caches must key on it (RFC 7240 2).
    response.headers["Vary"] = "Prefer"
    # `prefer` documents the header; RFC 7240 lets a client send it several times, and a
    # header parameter holds the first only.
    prefer = ", ".join(request.headers.getlist("prefer")) if prefer is not None else None
    if mode is None and (preferred := preferred_count(prefer)) is not None:
        mode = preferred
        response.headers["Preference-Applied"] = f"count={mode.value}"
    settings: Settings = request.app.state.settings
    return await service.list_items(
        filters, sort, paging, mode or CountMode.estimated, settings.count_threshold
    )


# The comma-separated preferences of a header; a comma inside a quoted value is the value's.
_PREFERENCES = re.compile(r'(?:[^,"]|"[^"]*"?)+')


def preferred_count(prefer: str | None) -> CountMode | None:
    """The `count=` preference of a `Prefer` header; an unknown value is ignored, as RFC 7240
    asks of preferences a server does not understand."""
    for preference in _PREFERENCES.findall(prefer or ""):
        # `count=exact; foo=bar`: a preference may carry parameters (RFC 7240 2), ignored.
        token = preference.split(";", 1)[0]
        name, _, value = token.strip().partition("=")
        if name.strip().lower() == "count":
            try:
                return CountMode(value.strip().strip('"').lower())
            except ValueError:
                return None
    return None


@reads.get(
    "/scroll",
    response_model=ItemScroll,
    summary="Scroll through items with a cursor",
    responses=problem_responses(400, 422),
)
async def scroll_items(query: Annotated[ScrollQuery, Query()], request: Request) -> Response:
    """Keyset pagination: no total, one query per page at any depth, and rows added or
    removed meanwhile never make a page repeat or skip an item. A cursor belongs to its
    sort; a malformed, altered or mismatched one gets 400."""
    page = await service.scroll_items(
        query, query.sort, query.cursor, query.size, request.app.state.cursor_key
    )
    # Serialised here: FastAPI would validate the page again first, to the same JSON.
    return Response(page.model_dump_json(), media_type="application/json")


# The headers of an item response, declared for clients (and their generators).
_ETAG = {
    "ETag": {
        "description": 'The item\'s version, `"<id>-<version>"`: send it back as If-Match.',
        "schema": {"type": "string"},
    }
}
_LOCATION = {
    "Location": {"description": "The new item's URL.", "schema": {"type": "string"}}
}


@reads.get(
    "/{item_id}",
    response_model=ItemOut,
    summary="Get an item",
    response_description="The item, with its ETag.",
    responses={
        200: {"headers": _ETAG},
        304: {
            "description": "Not Modified: the item is still at the version If-None-Match "
            "names. No body.",
            "headers": _ETAG,
        },
        **problem_responses(404, 422),
    },
)
async def get_item(
    item_id: ItemId, response: Response, if_none_match: IfNoneMatch
) -> ItemOut | Response:
    """With `If-None-Match`, a 304 without a body while the item is unchanged (a cache
    revalidating what it holds)."""
    item = await service.get_item(item_id)
    if still_current(item, if_none_match):
        return Response(status_code=304, headers={"ETag": etag(item)})
    return _item_response(response, item)


def json_body(content_type: Annotated[str | None, Header(include_in_schema=False)] = None) -> None:
    """A body is JSON, and says so: one sent as a form (`curl -d`), as text or without a
    Content-Type is a 415 saying what to send, not a 422 that the body is "not a valid
    dictionary" (FastAPI reads a body as JSON only when its Content-Type says JSON)."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        sent = f"not {media_type!r}" if media_type else "and this request names no type"
        raise HTTPException(
            415, f"The body must be JSON (Content-Type: application/json), {sent}."
        )


@writes.post(
    "",
    status_code=201,
    summary="Create an item",
    response_description="The item, with its Location and ETag.",
    responses={201: {"headers": {**_LOCATION, **_ETAG}}, **problem_responses(409, 415, 422)},
    dependencies=[Depends(json_body)],
)
async def create_item(data: ItemCreate, request: Request, response: Response) -> ItemOut:
    item = await service.create_item(data)
    response.headers["Location"] = str(request.url_for("get_item", item_id=item.id))
    return _item_response(response, item)


@writes.patch(
    "/{item_id}",
    summary="Update some fields of an item",
    response_description="The updated item, with its new ETag.",
    responses={200: {"headers": _ETAG}, **problem_responses(404, 409, 412, 415, 422, 428)},
    dependencies=[Depends(json_body)],
)
async def update_item(
    item_id: ItemId, update: ItemUpdate, response: Response, if_match: IfMatch
) -> ItemOut:
    """Needs `If-Match` or the body's `version` (428 without either); 412 if the item has
    changed since, 409 if the new name is taken."""
    item = await service.update_item(item_id, update, version_match(item_id, if_match))
    return _item_response(response, item)


@writes.delete(
    "/{item_id}",
    status_code=204,
    response_class=Response,
    summary="Delete an item",
    responses=problem_responses(404, 412, 422),
)
async def delete_item(item_id: ItemId, if_match: IfMatch) -> Response:
    """With `If-Match`, only if the item is still at that version (else 412)."""
    await service.delete_item(item_id, version_match(item_id, if_match))
    return Response(status_code=204)


router = APIRouter()
router.include_router(reads)
router.include_router(writes)
