"""Text a person reads: what shows nothing on screen."""

import re

# Characters `str.isprintable()` lets through that show nothing (Unicode's default-ignorable
# code points - joiners, variation selectors, fillers - and the blank braille pattern):
# "tok\u034fen:ci" reads as "token:ci", and "\u200b" alone as nothing at all.
INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    "\u202a-\u202e\u2060-\u206f\u2800\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)


def shows_nothing(value: str) -> bool:
    """Whether `value` is only blanks and invisible characters."""
    return not INVISIBLE.sub("", value).strip()
