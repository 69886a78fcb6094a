"""Redis clients that authenticate: an ACL user from the URL, its password from a file, TLS.

Every Redis client of recsys (control store and watchers, online feature store, exposure
stream, ops CLI) is built by :func:`redis_client` / :func:`async_redis_client` from a URL and a
:class:`~recsys.settings.RedisAuth`:

- ``redis://USER@HOST:PORT/DB``: the ACL user (``deploy/redis-acl.conf`` defines
  ``recsys-server`` and ``recsys-ops``); without a user, Redis's ``default`` user.
- the password comes from ``RedisAuth.password_file`` (``--redis-password-file``,
  ``RECSYS_REDIS_PASSWORD_FILE``; a mounted Secret), read at every new connection so a rotated
  Secret applies on reconnect; a password inside the URL is still accepted when no file is
  given, never both.
- ``rediss://`` speaks TLS and verifies the server against ``RedisAuth.ca_file``
  (``--redis-ca-file``; default: the system's roots).

Refused credentials are not an outage: :func:`auth_error_message` turns them into one line
that names the setting to fix. Nor are TLS settings that do not fit the server (a certificate
the CA file does not verify, plain ``redis://`` to a TLS port): :func:`tls_error_message`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.credentials import CredentialProvider

from recsys.settings import RedisAuth

PASSWORD_FILE_SETTING = "--redis-password-file (RECSYS_REDIS_PASSWORD_FILE)"
CA_FILE_SETTING = "--redis-ca-file (RECSYS_REDIS_CA_FILE)"

E = TypeVar("E", bound=BaseException)


class RedisAuthError(ValueError):
    """Credentials or TLS settings that cannot be used; the message names the setting."""


class PasswordFileUnreadable(redis.ConnectionError):
    """The password file cannot be read. A ConnectionError, so that to the watchers an
    unmounted Secret is like an outage (they keep serving and retry)."""


class PasswordFileCredentials(CredentialProvider):
    """The URL's user with the password read from a file at each new connection."""

    def __init__(self, username: str, password_file: Path) -> None:
        self.username = username
        self.password_file = password_file

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        try:
            password = self.password_file.read_text().rstrip("\r\n")
        except OSError as e:
            raise PasswordFileUnreadable(
                f"{PASSWORD_FILE_SETTING} {self.password_file}: cannot read ({e.strerror or e})"
            ) from e
        return (self.username, password) if self.username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return await asyncio.to_thread(self.get_credentials)


def client_arguments(url: str, auth: RedisAuth) -> tuple[str, dict[str, Any]]:
    """The URL to give ``from_url`` and the keyword arguments that go with it."""
    parts = urlsplit(url)
    kwargs: dict[str, Any] = {}
    if auth.password_file is not None:
        if parts.password is not None:
            raise RedisAuthError(
                f"Redis URL {redacted(url)} holds a password and {PASSWORD_FILE_SETTING} is "
                "given: keep the password in the file only"
            )
        username = unquote(parts.username or "")
        host = parts.netloc.rsplit("@", 1)[-1]
        url = urlunsplit(parts._replace(netloc=host))
        kwargs["credential_provider"] = PasswordFileCredentials(username, auth.password_file)
    if parts.scheme == "rediss":
        kwargs["ssl_cert_reqs"] = "required"
        if auth.ca_file is not None:
            kwargs["ssl_ca_certs"] = str(auth.ca_file)
    elif auth.ca_file is not None and parts.scheme == "redis":
        raise RedisAuthError(
            f"{CA_FILE_SETTING} is given but Redis URL {redacted(url)} is plain redis://: "
            "use rediss:// for TLS"
        )
    return url, kwargs


def redis_client(url: str, auth: RedisAuth, **options: Any) -> redis.Redis:
    """A synchronous client for ``url`` authenticating as ``auth`` says."""
    url, kwargs = client_arguments(url, auth)
    return redis.Redis.from_url(url, **kwargs, **options)


def async_redis_client(url: str, auth: RedisAuth, **options: Any) -> aioredis.Redis:
    """An asyncio client for ``url`` authenticating as ``auth`` says."""
    url, kwargs = client_arguments(url, auth)
    return aioredis.Redis.from_url(url, **kwargs, **options)


def redacted(url: str) -> str:
    """``url`` without a password, for messages."""
    if "@" in url:
        scheme, rest = url.split("://", 1)
        user = rest.split("@", 1)[0].split(":", 1)[0]
        return f"{scheme}://{user}:***@{rest.rsplit('@', 1)[1]}"
    return url


def url_user(url: str) -> str:
    """The Redis user a URL names (``default`` when it names none)."""
    return unquote(urlsplit(url).username or "") or "default"


def auth_error_message(url: str, auth: RedisAuth, error: Exception) -> str:
    """One line for credentials Redis refused, naming what to fix."""
    user = url_user(url)
    where = (
        f"the password in {PASSWORD_FILE_SETTING} {auth.password_file}"
        if auth.password_file is not None
        else f"no password ({PASSWORD_FILE_SETTING} not given)"
        if urlsplit(url).password is None
        else "the password in the URL"
    )
    return f"Redis {redacted(url)} refused user {user!r} with {where}: {error}"


def _in_chain(error: BaseException, kind: type[E]) -> E | None:
    """The first exception of type ``kind`` among ``error`` and its causes (redis-py wraps the
    socket's and ssl's errors in its ConnectionError)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def speaks_tls(host: str, port: int, timeout_seconds: float = 2.0) -> bool:
    """Whether the server at ``host:port`` completes a TLS handshake (nothing is verified or
    sent: this only tells a TLS port from a plaintext one)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_seconds) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            return True
    except (OSError, ValueError):  # ssl.SSLError is an OSError
        return False


def tls_error_message(url: str, auth: RedisAuth, error: BaseException) -> str | None:
    """One line naming what to fix when the connection error ``error`` comes from TLS
    settings that do not fit the server at ``url``; None when it looks like an outage.

    A ``rediss://`` server whose certificate does not verify against the CA file (or the
    system's roots); a plain ``redis://`` connection reset by a server that speaks TLS on that
    port (asked with a second, TLS, connection)."""
    parts = urlsplit(url)
    unverified = _in_chain(error, ssl.SSLCertVerificationError)
    if unverified is not None:
        trusted = (
            f"{CA_FILE_SETTING} {auth.ca_file}"
            if auth.ca_file is not None
            else f"the system's roots ({CA_FILE_SETTING} not given)"
        )
        reason = unverified.verify_message or unverified.reason or str(unverified)
        return (
            f"Redis {redacted(url)}: the server's TLS certificate does not verify against "
            f"{trusted}: {reason}"
        )
    if (
        parts.scheme == "redis"
        and _in_chain(error, ConnectionResetError) is not None
        and parts.hostname is not None
        and speaks_tls(parts.hostname, parts.port or 6379)
    ):
        return (
            f"Redis {redacted(url)}: the server speaks TLS on port {parts.port or 6379}; use a "
            f"rediss:// URL (and {CA_FILE_SETTING} for its CA)"
        )
    return None


def check_credentials(url: str, auth: RedisAuth, *, timeout_seconds: float = 2.0) -> None:
    """Raise :class:`RedisAuthError` if Redis at ``url`` refuses the credentials or the TLS
    settings do not fit it. An unreachable Redis passes (servers start from their last-good
    copies and reconnect)."""
    client = redis_client(
        url, auth, socket_connect_timeout=timeout_seconds, socket_timeout=timeout_seconds
    )
    try:
        client.ping()
    except redis.AuthenticationError as e:
        raise RedisAuthError(auth_error_message(url, auth, e)) from None
    except PasswordFileUnreadable as e:
        raise RedisAuthError(str(e)) from None
    except redis.ConnectionError as e:
        if (message := tls_error_message(url, auth, e)) is not None:
            raise RedisAuthError(message) from None
    except (redis.RedisError, OSError):  # unreachable, or not Redis: the clients will say
        pass
    finally:
        client.close()
