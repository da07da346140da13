"""The fields of JSON commands, checked: each bad field is a BAD_REQUEST naming it."""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import BadRequest, ProtocolError
from ..hub import Since
from ..protocol import validate_channel

#: longest client message id (``cid``) of a direct message, in characters
CID_MAX = 128


def user_id(value: object, field: str) -> str:
    """A user id: 1..255 bytes of UTF-8 without control characters (like a channel)."""
    if not isinstance(value, str):
        raise BadRequest(f'field "{field}" must be a string, got {type(value).__name__}')
    try:
        return validate_channel(value)
    except ProtocolError as e:
        raise BadRequest(e.reason.replace('field "ch"', f'field "{field}"')) from None


def since_field(value: object) -> Since | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest('field "since" must be an object {"off": N, "epoch": "..."}')
    off = value.get("off")
    epoch = value.get("epoch")
    if isinstance(off, bool) or not isinstance(off, int) or off < 0:
        raise BadRequest('field "since.off" must be an integer >= 0')
    if not isinstance(epoch, str) or len(epoch) > 64:
        raise BadRequest('field "since.epoch" must be a string of at most 64 characters')
    return Since(off, epoch)


def history_field(msg: dict[str, Any], since: Since | None) -> Since | None:
    """A sub's ``since``, or its ``"history": N`` (the newest N messages: a new reader)."""
    n = msg.get("history")
    if n is None:
        return since
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise BadRequest('field "history" must be an integer >= 0')
    if since is not None:
        raise BadRequest('a sub takes "since" or "history", not both')
    return Since(n, "", last=True) if n else None


def json_data(value: object) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as e:
        raise BadRequest(f'field "data" cannot be encoded: {e}') from None


def welcome_tail(req_id: Any) -> bytes:
    """Closes a JSON object begun elsewhere, with the op and the request id."""
    out = b',"op":"welcome"'
    if req_id is not None:
        out += b',"id":' + orjson.dumps(req_id)
    return out + b"}"
