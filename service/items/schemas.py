"""What the items API reads and writes: input bodies, the output item, filters and sorts."""

import re
import unicodedata
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Query
from fastapi_pagination import Page, Params
from fastapi_pagination.customization import (
    CustomizedPage,
    UseAdditionalFields,
    UseFieldTypeAnnotations,
    UseModelConfig,
    UseName,
    UseOptionalFields,
    UseParams,
)
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from service.text import shows_nothing

CENT = Decimal("0.01")


def _two_places(value: Decimal) -> Decimal:
    # "5", "5.0" and "5.00" are the same price; "-0" is 0.
    return value.quantize(CENT) if value else Decimal("0.00")


def _as_utc(value: datetime) -> datetime:
    """Naive datetimes are UTC; aware ones are converted to UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("datetime is out of range once converted to UTC") from None


_OFFSET_SEEN_AS_SPACE = re.compile(r" (\d{2}:?\d{2})$")


def _iso_8601(value: Any) -> Any:
    """A time is ISO 8601 text: pydantic would also take "0.0" as a Unix timestamp, which
    the API does not document (the fuzzer sends numbers where a date-time is asked for).

    Times are stored to the microsecond: a finer one ("...:13.384842900Z", as Go and Java
    write them) is taken as the next microsecond up, where pydantic would cut it off. For
    the bounds of a filter that is exact: a stored time is at or after (before) the given
    one exactly when it is at or after (before) that microsecond."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or _A_NUMBER.fullmatch(value.strip()):
        raise ValueError("must be an ISO 8601 date-time, e.g. 2026-11-23T12:00:00Z")
    # An unencoded "+02:00" in a query string arrives as " 02:00".
    value = _OFFSET_SEEN_AS_SPACE.sub(r"+\1", value)
    finer = _FINER_THAN_MICROSECONDS.search(value)
    if finer is None:
        return value
    value = value[: finer.start(1)] + value[finer.end(1):]
    moment = _DATETIME.validate_python(value)
    if finer.group(1).strip("0"):
        moment = _as_utc(moment)  # the microsecond up may not exist in the local time
        try:
            moment += timedelta(microseconds=1)
        except OverflowError:
            raise ValueError("datetime is out of range once rounded up") from None
    return moment


_FINER_THAN_MICROSECONDS = re.compile(r"[.,][0-9]{6}([0-9]+)")
_DATETIME = TypeAdapter(datetime)


def ascii_digits(value: Any) -> Any:
    """A whole number in a URL is written in ASCII digits: pydantic would also read "1_0"
    as 10, and "+1", " 1" and "1.0" as 1 - many URLs for one page or item."""
    if isinstance(value, str) and not _DIGITS.fullmatch(value):
        raise ValueError("must be a whole number in ASCII digits without leading zeros, e.g. 20")
    return value


_DIGITS = re.compile(r"0|[1-9][0-9]*")  # no leading zeros: one number, one way to write it
# A whole number in a path or a query string.
UrlInt = Annotated[int, BeforeValidator(ascii_digits)]
_A_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def one_line(value: str) -> str:
    """Names and searches are one line of printable text: no control characters (NUL
    included, which PostgreSQL cannot store), line separators or lone surrogates."""
    if any(unicodedata.category(char) in {"Cc", "Cs", "Zl", "Zp"} for char in value):
        raise ValueError("must not contain control characters or line breaks")
    return value


NAME_MAX_LENGTH = 200


def _composed(value: str) -> str:
    return unicodedata.normalize("NFC", value)


def _name(value: str) -> str:
    """A name is stored in Unicode's composed form (NFC), so "Cafe\u0301" and "Café" are one
    name, and it must show something: a zero-width space alone is no name."""
    value = _composed(value)
    if shows_nothing(value):
        raise ValueError("must contain a visible character")
    if len(value) > NAME_MAX_LENGTH:  # counted once composed: "e\u0301" is one character
        raise PydanticCustomError(
            "string_too_long",
            "String should have at most {max_length} characters (composed, Unicode NFC)",
            {"max_length": NAME_MAX_LENGTH},
        )
    return value


def _text(value: str) -> str:
    """Free text may break lines and use tabs, but holds no other control character."""
    if any(unicodedata.category(c) in {"Cc", "Cs"} and c not in "\t\n\r" for c in value):
        raise ValueError("must not contain control characters other than tab and line breaks")
    return value


Name = Annotated[
    str,
    # The length is checked once composed (`_name`): "e\u0301" is one character.
    StringConstraints(strip_whitespace=True, min_length=1),
    AfterValidator(one_line),
    AfterValidator(_name),
    Field(
        json_schema_extra={"maxLength": NAME_MAX_LENGTH},
        description="1-200 characters, surrounding whitespace removed, no control "
        "characters, at least one visible; stored composed (Unicode NFC). Unique "
        "regardless of case.",
        examples=["Walnut desk lamp"],
    ),
]
Description = Annotated[
    Annotated[str, AfterValidator(_text)] | None,
    Field(
        description="Free text; tabs and line breaks but no other control characters.",
        examples=["Warm light."],
    ),
]
_DECIMAL_TEXT = re.compile(r"[ \t\r\n]*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?[ \t\r\n]*")


def _decimal_text(value: Any) -> Any:
    """A price given as text is written the way JSON writes numbers, in ASCII digits:
    Python's `Decimal` would also read "1_000" and full-width digits."""
    if isinstance(value, str) and not _DECIMAL_TEXT.fullmatch(value):
        raise ValueError('must be a decimal number in ASCII digits, e.g. "12.50"')
    return value


# What a price is, in JSON Schema (pydantic would write `ge`, `max_digits` and
# `decimal_places` as they are, which are not JSON Schema words): a number, or the text of
# one as clients should write it.
_PRICE_SCHEMA: JsonSchemaValue = {
    "anyOf": [
        {"type": "number", "minimum": 0, "maximum": 9_999_999_999.99, "multipleOf": 0.01},
        {"type": "string", "pattern": r"^[0-9]{1,10}(\.[0-9]{1,2})?$"},
    ]
}
# A price, or a bound of a price filter.
PriceValue = Annotated[
    Decimal,
    BeforeValidator(_decimal_text),
    Field(ge=0, max_digits=12, decimal_places=2),
    WithJsonSchema(_PRICE_SCHEMA),
    # "0E-20000" has no decimal places, and asyncpg cannot send its exponent: 0.00.
    AfterValidator(_two_places),
]
PRICE_HELP = (
    "Non-negative, at most 2 decimal places and 10 whole digits; a JSON number or a string "
    '("12.5", "12.50"). NaN and Infinity are refused.'
)
Price = Annotated[PriceValue, Field(description=PRICE_HELP, examples=["49.90"])]
# Prices go out as strings with exactly two places, so no client rounds them through a float:
# pydantic writes a Decimal as its string, and every price has two places already (the
# column is NUMERIC(12, 2); input is quantized by `Price`). No Python serializer per item.
PriceOut = Annotated[Decimal, Field(examples=["49.90"])]
UTCDateTimeIn = Annotated[datetime, BeforeValidator(_iso_8601), AfterValidator(_as_utc)]


class Body(BaseModel):
    """A request body: fields it does not know are refused (422), each named - up to
    `UNKNOWN_FIELDS_NAMED` of them; more are one error, so that a 1 MiB body of 90,000
    made-up keys costs milliseconds, not seconds of the event loop and an 8 MB answer."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _not_too_many_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) > UNKNOWN_FIELDS_NAMED:
            unknown = [key for key in data if key not in cls.model_fields]
            if len(unknown) > UNKNOWN_FIELDS_NAMED:
                raise PydanticCustomError(
                    "extra_forbidden",
                    "{count} fields are not allowed here, e.g. {names}",
                    {"count": len(unknown),
                     "names": ", ".join(map(repr, unknown[:UNKNOWN_FIELDS_NAMED]))},
                )
        return data


UNKNOWN_FIELDS_NAMED = 10


class ItemCreate(Body):
    """A new item."""

    name: Name
    description: Description = None
    price: Price


def _not_nullable(schema: JsonSchemaValue) -> None:
    """Take `null` out of an optional field's schema: the field may be left out, not null."""
    branches = [b for b in schema.pop("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        schema.update({**branches[0], **schema})
    elif branches:
        schema["anyOf"] = branches


class ItemUpdate(Body):
    """A partial update: fields left out keep their value. `description: null` clears it;
    `name` and `price` cannot be null."""

    # Not null (`_not_null`), so not nullable in the schema either.
    name: Name | None = Field(None, json_schema_extra=_not_nullable)
    description: Description = None
    price: Price | None = Field(None, description=PRICE_HELP, json_schema_extra=_not_nullable)
    version: int | None = Field(
        None,
        ge=1,
        strict=True,  # a JSON integer: not `true`, "3" or 3.0
        description="The version you read. The update applies only if the item is still at "
        "this version (the alternative to the If-Match header).",
    )

    @field_validator("name", "price")
    @classmethod
    def _not_null(cls, value: object) -> object:
        # Runs only for values the client sent: a left-out field keeps its default.
        if value is None:
            raise ValueError("may be left out but not set to null")
        return value

    def changes(self) -> dict[str, Any]:
        """The item fields the client sent, by name (`version` is a precondition, not a
        change)."""
        return {name: getattr(self, name) for name in self.model_fields_set - {"version"}}


class ItemOut(BaseModel):
    """An item as stored."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    description: str | None
    price: PriceOut
    created_at: datetime = Field(description="ISO 8601, UTC.")
    updated_at: datetime = Field(description="ISO 8601, UTC.")
    version: int = Field(
        description="Bumped by every update that changes the item; send it back (or the "
        "ETag as If-Match) to update."
    )
    created_by: str = Field(
        description="Who created the item: the `sub` of their JWT, or `token:<label>` for "
        "an API token; `unknown` for items from before this was recorded."
    )
    updated_by: str = Field(description="Who changed the item last, in the same terms.")


class ItemFilters(BaseModel):
    """Query filters of the item lists; all optional, combined with AND."""

    q: Annotated[str, AfterValidator(one_line), AfterValidator(_composed)] | None = Field(
        None,
        max_length=200,
        description="Part of the name, case-insensitive; % and _ match themselves.",
    )
    min_price: PriceValue | None = Field(None, description="Price at least this.")
    max_price: PriceValue | None = Field(None, description="Price at most this.")
    created_after: UTCDateTimeIn | None = Field(
        None, description="Created at or after this ISO 8601 time (no offset = UTC)."
    )
    created_before: UTCDateTimeIn | None = Field(
        None, description="Created strictly before this ISO 8601 time (no offset = UTC)."
    )


class CountMode(StrEnum):
    """How `GET /items` counts its `total` (PostgREST's `Prefer: count=...` modes)."""

    exact = "exact"  # every matching row: exact, but its cost grows with the table
    estimated = "estimated"  # exact up to a threshold, then the planner's estimate
    none = "none"  # no count: total and pages are null


class ItemSort(StrEnum):
    """`field` ascending or `-field` descending; ties are broken by id in the same
    direction, so the order is total and pages are stable."""

    id_asc = "id"
    id_desc = "-id"
    name_asc = "name"
    name_desc = "-name"
    price_asc = "price"
    price_desc = "-price"
    created_at_asc = "created_at"
    created_at_desc = "-created_at"

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        # Client generators name enum members after the values; `-id` would become `VALUE_1`.
        # x-enum-varnames gives them readable names: ID_ASC, ID_DESC, ...
        schema = handler(core_schema)
        schema = handler.resolve_ref_schema(schema)
        schema["x-enum-varnames"] = [member.name.upper() for member in cls]
        return schema

    @property
    def field(self) -> str:
        return self.value.removeprefix("-")

    @property
    def descending(self) -> bool:
        return self.value.startswith("-")


# The longest cursor the scroll accepts: one that ends a page on a name of 200 characters
# of 4 UTF-8 bytes each, sorted by `-name`, at the largest id, is 1,155 characters.
CURSOR_MAX_LENGTH = 1200

# The sort and page size parameters of both lists.
SORT_HELP = "`field` or `-field` (descending); ties are ordered by id."
SIZE_HELP = "Items per page, 1-100."


class ScrollQuery(ItemFilters):
    """The query of `GET /items/scroll`: the filters, the sort, and where and how far to go.
    One model, so FastAPI reads the whole query in one pass instead of parameter by
    parameter."""

    sort: ItemSort = Field(ItemSort.id_asc, description=SORT_HELP)
    cursor: str | None = Field(
        None,
        # Longer is malformed: a 400 like any other cursor not made here (`_position`).
        json_schema_extra={"maxLength": CURSOR_MAX_LENGTH},
        description="`next_page` of the previous page; none to start.",
    )
    size: UrlInt = Field(20, ge=1, le=100, description=SIZE_HELP)


class PageParams(Params):
    """`page` and `size` of `GET /items`."""

    # A page beyond 2**31 would only overflow OFFSET; deep reading is what /scroll is for.
    page: int = Query(1, ge=1, le=2**31 - 1, description="Page number, from 1.")
    size: int = Query(20, ge=1, le=100, description=SIZE_HELP)

    # A validator, not `UrlInt`: fastapi-pagination's own dependency (`add_pagination`)
    # reads these fields' signature, which must stay `int = Query(...)`.
    _ascii_digits = field_validator("page", "size", mode="before")(ascii_digits)


ItemPage = CustomizedPage[
    Page[ItemOut],
    UseName("ItemPage"),
    # A list, as Page's Sequence is validated and serialised through Python item by item.
    UseFieldTypeAnnotations(items=list[ItemOut]),
    # With count=none there is no total, so no number of pages either.
    UseOptionalFields(fields=("total", "pages")),
    # They are always sent, null or not: required in the response schema, so a generated
    # client types them `int | None`, not "maybe unset".
    UseModelConfig(json_schema_serialization_defaults_required=True),
    UseAdditionalFields(
        total_is_exact=Annotated[
            bool,
            Field(
                description="Whether `total` (and so `pages`) is the exact number of matching "
                "items: false when it is the planner's estimate or a lower bound "
                "(`count=estimated` above the threshold) or absent (`count=none`)."
            ),
        ]
    ),
    UseParams(PageParams),
]


class ItemScroll(BaseModel):
    """One page of a keyset scroll."""

    items: list[ItemOut]
    next_page: str | None = Field(
        description="Cursor of the next page (pass it as `cursor`); null on the last page."
    )
