"""Which backend a control-plane URL names: the file store or Redis."""

from __future__ import annotations

from pathlib import Path

from recsys.control.file_store import FileStore
from recsys.control.redis_store import RedisStore
from recsys.control.store import DocumentStore, StoreError
from recsys.settings import RedisAuth


def open_store(
    url: str, artifacts: Path, *, prefix: str = "recsys:", auth: RedisAuth | None = None
) -> DocumentStore:
    """``""`` or ``file:`` -> the file in ``artifacts/control``; ``redis://HOST:PORT/DB`` -> Redis.

    ``file:PATH`` names another directory for the file backend. ``auth``: the Redis user's
    password file and CA (recsys/control/redis_auth.py).
    """
    if url in ("", "file:"):
        return FileStore(artifacts / "control")
    if url.startswith("file:"):
        return FileStore(Path(url.removeprefix("file:")))
    if url.startswith(("redis://", "rediss://")):
        return RedisStore(url, prefix=prefix, auth=auth or RedisAuth())
    raise StoreError(
        f"control URL {url!r}: expected '' or 'file:' (the artifact root) or redis://HOST:PORT/DB"
    )
