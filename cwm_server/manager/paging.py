"""Page tokens and page sizes, the same for every List RPC (windows, keyed chunks).

A token is the last name (or key) of the page, base64url-encoded: opaque to clients, and
checked on the way back in like the name it carries, so a forged token is INVALID_ARGUMENT
and never reaches a query.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable

from cwm_client.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    """The page size a List call asked for (0: the default); INVALID_ARGUMENT above the cap."""
    if requested > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size {requested} exceeds {MAX_PAGE_SIZE}", field="page_size")
    return requested or DEFAULT_PAGE_SIZE


def encode_page_token(last: str) -> str:
    return base64.urlsafe_b64encode(last.encode()).decode()


def decode_page_token(token: str, check: Callable[[str], str]) -> str:
    """Where the next page starts ("" for the first); `check` validates what the token
    carries (a window name, a key)."""
    if not token:
        return ""
    try:
        return check(base64.urlsafe_b64decode(token.encode()).decode())
    except (binascii.Error, UnicodeDecodeError, ValueError, InvalidArgument):
        raise InvalidArgument(
            "page_token is not one this server issued; pass next_page_token unchanged",
            field="page_token",
        ) from None
