"""A guard in front of MLflow's scoring server: a request body too large or JSON nested too deep
gets HTTP 400 before MLflow parses it.

MLflow's server parses the body with ``json.loads`` before any model code runs and answers a
``RecursionError`` (JSON nested thousands of levels deep) with HTTP 500; it reads bodies of any
size. ``leukemia serve`` runs the same scoring app (``mlflow.pyfunc.scoring_server.init``)
wrapped in ``RequestGuard``: the body is read up to ``max_body_bytes`` and its nesting measured
with the strings blanked out, in C speed, before the request is passed on unchanged.
"""

from __future__ import annotations

import json
import re

import numpy as np

MAX_BODY_BYTES = 64 * 1024 * 1024  # 64 base64 images of about 700 kB each
MAX_DEPTH = 64  # a dataframe_split request nests 4 levels deep
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_STEP = np.zeros(256, np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def json_depth(body: bytes) -> int:
    """The deepest nesting of ``[``/``{`` outside strings (0 for a scalar)."""
    structure = _STRING.sub(b'""', body)
    if not structure:
        return 0
    steps = _STEP[np.frombuffer(structure, np.uint8)].astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


class RequestGuard:
    """ASGI middleware: refuse oversized or deeply nested bodies with 400, pass the rest on."""

    def __init__(self, app, max_body_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_DEPTH):
        self.app, self.max_body_bytes, self.max_depth = app, max_body_bytes, max_depth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                return await _refuse(
                    send, f"request body over {self.max_body_bytes} bytes; send fewer images"
                )
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        depth = json_depth(body)
        if depth > self.max_depth:
            return await _refuse(
                send,
                f"JSON nested {depth} levels deep; expected at most {self.max_depth} "
                '(a request is {"dataframe_split": {"columns": ["image"], "data": [[...]]}})',
            )
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _refuse(send, message: str) -> None:
    payload = json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": payload})
