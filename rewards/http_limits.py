"""Request-body limits shared by the reward server and the human-evaluation app: how many bytes a request may send,
decided from its headers before any of the body is read, and reading at most that many within a deadline.

Both raise BodyRefused(status, message); each server turns it into its own kind of answer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Mapping

from starlette.requests import ClientDisconnect, Request

log = logging.getLogger(__name__)

MAX_LENGTH_DIGITS = 20  # more digits than any body a server would take; int() of a megabyte of digits is slow


class BodyRefused(Exception):
    """The request's body is refused: `status` is the HTTP status to answer, `message` one line for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class ClientGone(BodyRefused):
    """The client closed the connection before its whole body arrived: nobody is left to answer."""

    def __init__(self) -> None:
        super().__init__(400, "the client closed the connection before sending its whole body")


def content_length(headers: Mapping[str, str], limit: int, *, chunked: bool) -> int:
    """The most bytes the request's body may have, from its headers alone: its Content-Length (0 without one),
    after checking it against `limit`. A body framed by Transfer-Encoding carries no length: with `chunked` it may
    use the whole limit, otherwise it is refused (411). Transfer-Encoding wins over a Content-Length sent with it,
    as HTTP/1.1 says, so a request cannot declare 0 bytes and then stream more."""
    if "transfer-encoding" in headers:
        if chunked:
            return limit
        raise BodyRefused(411, "a request body must come with a Content-Length (chunked bodies are not accepted)")
    length = headers.get("content-length")
    if length is None:
        return 0
    # ASCII digits only: str.isdigit() and int() also take "²", "١" or "1_0".
    if not (length.isascii() and length.isdigit()) or len(length) > MAX_LENGTH_DIGITS:
        raise BodyRefused(400, f"Content-Length must be a number of bytes, got {length[:40]!r}")
    size = int(length)
    if size > limit:
        raise BodyRefused(413, f"the request body is too large ({size} bytes; at most {limit})")
    return size


async def read_bounded(request: Request, size: int, deadline_s: float, *, exact: bool) -> bytearray:
    """The request's body: at most `size` bytes (exactly `size` when `exact`, the request's Content-Length), all
    within `deadline_s` seconds. A longer body is refused (413) as soon as it passes `size`, so no more is held than
    was reserved; a body still arriving at the deadline is refused (408), so a stalled upload cannot hold its
    reservation forever; a client that hangs up mid-body raises ClientGone."""
    # A known size is allocated once and filled in place: no list of chunks, no reallocation copies.
    body = bytearray(size) if exact else bytearray()
    received = 0
    try:
        async with asyncio.timeout(deadline_s):
            async for chunk in request.stream():
                if received + len(chunk) > size:
                    what = f"its Content-Length ({size} bytes)" if exact else f"the limit ({size} bytes)"
                    raise BodyRefused(413, f"the request body is longer than {what}")
                if exact:
                    body[received:received + len(chunk)] = chunk
                else:
                    body += chunk
                received += len(chunk)
    except TimeoutError:
        came = f"{received} of {size}" if exact else str(received)
        raise BodyRefused(408, f"the request body did not arrive within {deadline_s:g} s ({came} bytes came)") from None
    except ClientDisconnect:
        raise ClientGone() from None
    if exact and received != size:  # a server that does not frame by Content-Length itself
        raise BodyRefused(400, f"the request body has {received} bytes, not its Content-Length ({size})")
    return body
