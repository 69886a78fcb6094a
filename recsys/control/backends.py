"""Which backend a control-plane URL names: the file store or Redis."""

from __future__ import annotations

from pathlib import Path

from recsys.control.file_store import FileStore
from recsys.control.redis_store import RedisStore
from recsys.control.store import DocumentStore, StoreError


def open_store(url: str, artifacts: Path, *, prefix: str = "recsys:") -> DocumentStore:
    """``""`` or ``file:`` -> the file in ``artifacts/control``; ``redis://HOST:PORT/DB`` -> Redis.

    ``file:PATH`` names another directory for the file backend.
    """
    if url in ("", "file:"):
        return FileStore(artifacts / "control")
    if url.startswith("file:"):
        return FileStore(Path(url.removeprefix("file:")))
    if url.startswith(("redis://", "rediss://")):
        return RedisStore(url, prefix=prefix)
    raise StoreError(
        f"control URL {url!r}: expected '' or 'file:' (the artifact root) or redis://HOST:PORT/DB"
    )
