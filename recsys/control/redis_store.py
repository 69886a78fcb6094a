"""The fleet control plane: documents in Redis, every key under one prefix.

Keys, per document name (the ``{name}`` hash tag keeps them in one Redis Cluster slot)::

    <prefix>control:{<name>}            the current Document as JSON (version inside)
    <prefix>control:{<name>}:version    the version counter (an integer; pollers read only this)
    <prefix>control:{<name>}:history    a list of HistoryEntry JSON, newest first, capped
    <prefix>control:{<name>}:changed    the pub/sub channel; each write publishes its version

A write is one Lua script: compare the counter with the expected version, then set the document
and counter, push the history entry and publish, atomically. Nothing outside the prefix is read
or written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis

from recsys.control.redis_auth import (
    PasswordFileUnreadable,
    auth_error_message,
    redacted,
    redis_client,
    tls_error_message,
    url_user,
)
from recsys.control.store import (
    HISTORY_LIMIT,
    CorruptDocument,
    Document,
    HistoryEntry,
    StoreError,
    StoreForbidden,
    StoreUnavailable,
    VersionConflict,
    check_expected_version,
    check_name,
    encode_body,
    history_entry,
    new_document,
)
from recsys.settings import RedisAuth

NO_AUTH = RedisAuth()

CONNECT_TIMEOUT_SECONDS = 2.0

# KEYS: document, version, history. ARGV: expected version, document JSON, history JSON,
# history limit, channel. Returns {1, new version} or {0, current version}.
_WRITE_SCRIPT = """
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if current ~= tonumber(ARGV[1]) then
  return {0, current}
end
local version = current + 1
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], version)
redis.call('LPUSH', KEYS[3], ARGV[3])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[4]) - 1)
redis.call('PUBLISH', ARGV[5], version)
return {1, version}
"""


class DocumentKeys:
    """The Redis names of one document's keys and channel."""

    def __init__(self, prefix: str, name: str) -> None:
        base = f"{prefix}control:{{{check_name(name)}}}"
        self.document = base
        self.version = f"{base}:version"
        self.history = f"{base}:history"
        self.channel = f"{base}:changed"


class RedisStore:
    def __init__(self, url: str, *, prefix: str = "recsys:", auth: RedisAuth = NO_AUTH) -> None:
        self.url = url
        self.prefix = prefix
        self.auth = auth
        try:
            self._client = redis_client(
                url,
                auth,
                socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
                socket_timeout=CONNECT_TIMEOUT_SECONDS,
            )
        except ValueError as e:
            raise StoreError(f"control URL {redacted(url)}: {e}") from e
        self._write_script = self._client.register_script(_WRITE_SCRIPT)

    def keys(self, name: str) -> DocumentKeys:
        return DocumentKeys(self.prefix, name)

    def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """Run one Redis call, translating its errors once, here."""
        try:
            return fn(*args)
        except redis.AuthenticationError as e:  # a ConnectionError, but not an outage
            raise StoreError(auth_error_message(self.url, self.auth, e)) from e
        except PasswordFileUnreadable as e:
            raise StoreError(str(e)) from e
        except redis.exceptions.NoPermissionError as e:
            raise StoreForbidden(
                f"{redacted(self.url)}: Redis user {url_user(self.url)!r} may not {what} ({e}); "
                "the ops user (recsys-ops in deploy/redis-acl.conf) writes the control documents"
            ) from e
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if (message := tls_error_message(self.url, self.auth, e)) is not None:
                raise StoreError(message) from e  # a setting to fix, not an outage
            raise StoreUnavailable(
                f"{redacted(self.url)}: cannot reach Redis to {what} ({e})"
            ) from e
        except redis.RedisError as e:
            raise StoreError(f"{redacted(self.url)}: Redis refused to {what} ({e})") from e

    def read(self, name: str) -> Document | None:
        keys = self.keys(name)
        raw = self._call(f"read {name}", self._client.get, keys.document)
        if raw is None:
            return None
        try:
            return Document.from_json(raw, f"{redacted(self.url)} {keys.document}")
        except StoreError as e:
            raise CorruptDocument(
                name,
                self._counter(name),
                f"{redacted(self.url)} {keys.document}",
                str(e),
            ) from e

    def _counter(self, name: str) -> int:
        raw = self._call(f"read {name}", self._client.get, self.keys(name).version)
        try:
            return int(raw) if raw is not None else 0
        except ValueError as e:
            raise StoreError(f"{self.keys(name).version}: not a version counter ({raw!r})") from e

    def read_version(self, name: str) -> int:
        return self._counter(name)

    def read_raw(self, name: str) -> tuple[int, bytes | None]:
        raw = self._call(f"read {name}", self._client.get, self.keys(name).document)
        return self._counter(name), raw if raw is None else bytes(raw)

    def write(
        self, name: str, body: Mapping[str, Any], *, expected_version: int, author: str
    ) -> Document:
        copied = encode_body(name, body)
        keys = self.keys(name)
        current, _ = check_expected_version(self, name, expected_version)
        document = new_document(name, copied, expected_version + 1, author)
        entry = history_entry(current, document)
        ok, version = self._call(
            f"write {name}",
            self._write_script,
            [keys.document, keys.version, keys.history],
            [expected_version, document.to_json(), entry.to_json(), HISTORY_LIMIT, keys.channel],
        )
        if not ok:  # another writer landed between our read and the script
            try:
                now = self.read(name)
            except CorruptDocument:
                now = None
            raise VersionConflict(name, expected_version, now)
        assert int(version) == document.version
        return document

    def history(self, name: str, limit: int = 20) -> list[HistoryEntry]:
        raw = self._call(
            f"read the history of {name}",
            self._client.lrange,
            self.keys(name).history,
            0,
            max(limit, 1) - 1,
        )
        return [HistoryEntry.from_json(item) for item in raw]

    def close(self) -> None:
        self._client.close()
