"""Read a server's Prometheus page over real HTTP, as a scraper would."""

from __future__ import annotations

import urllib.request


def fetch_metrics(port: int, timeout: float = 30.0) -> str:
    """The text of ``http://127.0.0.1:<port>/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as page:
        text: str = page.read().decode()
    return text
