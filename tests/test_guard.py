"""``leukemia serve``: MLflow's scoring app behind a guard, so that an oversized or deeply nested
request gets HTTP 400, not MLflow's 500, and everything else is answered as before."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from leukemia.guard import RequestGuard, json_depth

from .conftest import free_port
from .test_model_files import _request, logged  # noqa: F401 - the logged-model fixture
from .test_serve_format import _model_copy


def test_json_depth_ignores_brackets_inside_strings():
    assert json_depth(b'"x"') == 0
    assert json_depth(b'{"a": [[1, 2], {"b": "[[[[{{{{"}]}') == 3
    assert json_depth(b'{"a": "\\\\"}') == 1  # an escaped backslash closes the string
    assert json_depth(b'{"a": "\\"[[["}') == 1  # an escaped quote does not
    assert json_depth(b"[" * 100_000 + b"]" * 100_000) == 100_000


def _call(body: bytes, chunk: int = 1000) -> tuple[int, bytes, bytes]:
    """Drive the guard with one POST of ``body`` in chunks; (status, body, what the app behind
    it received)."""
    received = []
    sent = []

    async def inner(scope, receive, send):
        while True:
            message = await receive()
            received.append(message["body"])
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/invocations"}
    asyncio.run(RequestGuard(inner, max_body_bytes=10_000, max_depth=8)(scope, receive, send))
    return sent[0]["status"], sent[1]["body"], b"".join(received)


def test_the_guard_refuses_before_the_app_and_passes_the_rest_unchanged():
    good = json.dumps({"dataframe_split": {"columns": ["image"], "data": [["x" * 5000]]}})
    assert _call(good.encode()) == (200, b"ok", good.encode())  # whole, in one piece
    status, answer, seen = _call(b"[" * 9 + b"]" * 9)
    assert status == 400 and seen == b""
    assert json.loads(answer)["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "nested 9 levels deep; expected at most 8" in json.loads(answer)["message"]
    status, answer, seen = _call(b'"' + b"x" * 20_000 + b'"')
    assert status == 400 and seen == b"" and b"over 10000 bytes" in answer


@pytest.mark.slow
def test_leukemia_serve_answers_images_and_refuses_deep_json_with_400(logged, tmp_path):  # noqa: F811
    _, original = logged
    folder = _model_copy(original, tmp_path / "model")
    port = free_port()
    venv_bin = Path(sys.executable).parent
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [venv_bin / "leukemia", "serve", "-m", str(folder), "-p", str(port)],
            env={**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert server.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        frame = _request(1)
        good = {"dataframe_split": {"columns": ["image"], "data": [[frame["image"][0]]]}}
        assert _post(f"{base}/invocations", json.dumps(good).encode())[0] == 200
        deep = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        status, body = _post(f"{base}/invocations", deep)
        assert status == 400 and "nested 100001 levels deep" in body["message"]
        garbage = {"dataframe_split": {"columns": ["image"], "data": [["%%%"]]}}
        status, body = _post(f"{base}/invocations", json.dumps(garbage).encode())
        assert status == 400 and "not valid base64" in body["message"]  # MLflow's own 400
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
