"""A lease in Redis so that two controller replicas never act at once.

The holder sets ``key`` to its own token with ``SET NX PX`` and renews it (a compare-and-
``PEXPIRE`` script) well within the time to live; another replica's ``SET NX`` fails until the
holder stops renewing (it releases the key on a clean exit with a compare-and-``DEL``, or the key
expires ``ttl`` after a crash). :class:`RedisLease` renews on a thread of its own so a long look
(a retraining) does not lose it; the controller checks :attr:`RedisLease.held` before each
routing change.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
from typing import Any

import redis

RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisLease:
    def __init__(self, client: redis.Redis, key: str, ttl_seconds: float) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = int(ttl_seconds * 1000)
        self.token = f"{socket.gethostname()}:{secrets.token_hex(8)}"
        """This holder's value of the key: the pod's name, then a random part."""
        self._held = threading.Event()
        self._stop = threading.Event()
        self._renew: Any = client.register_script(RENEW_SCRIPT)
        self._release: Any = client.register_script(RELEASE_SCRIPT)
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._held.is_set()

    def holder(self) -> str:
        """Who holds the lease now ('' for nobody)."""
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else str(value or "")

    def try_acquire(self) -> bool:
        """Take the lease if it is free, renew it if it is ours; False if another holds it or
        Redis cannot be reached (then nothing may act)."""
        try:
            if self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
                ok = True
            else:
                ok = bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))
        except redis.RedisError:
            ok = False
        if ok:
            self._held.set()
        else:
            self._held.clear()
        return ok

    def start_renewing(self) -> None:
        """Renew (or take) the lease every third of its time to live until :meth:`release`."""

        def renew() -> None:
            while not self._stop.wait(self.ttl_ms / 3000):
                self.try_acquire()

        self._thread = threading.Thread(target=renew, name="lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._held.is_set():
            self._held.clear()
            with contextlib.suppress(redis.RedisError):  # else it expires after its ttl
                self._release(keys=[self.key], args=[self.token])
