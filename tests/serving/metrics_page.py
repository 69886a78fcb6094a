"""Read a server's Prometheus page over real HTTP, as a scraper would."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def fetch_metrics(port: int, timeout: float = 30.0) -> str:
    """The text of ``http://127.0.0.1:<port>/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as page:
        text: str = page.read().decode()
    return text


def post_json(
    port: int, body: object, *, path: str = "/v1/recommend", timeout: float = 30.0
) -> tuple[int, Any]:
    """POST ``body`` as JSON to ``http://127.0.0.1:<port><path>``: (HTTP status, decoded JSON)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=body if isinstance(body, bytes) else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
