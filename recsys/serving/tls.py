"""TLS on the gRPC port: the server's certificate, optional client certificates (mutual TLS),
and reloading both when their files change.

gRPC calls :meth:`CertificateFiles.fetch` at every new connection (its dynamic credentials,
``grpc.dynamic_ssl_server_credentials``); it compares the files' (inode, size, mtime) with the
ones it last loaded and hands gRPC a new configuration only when they changed, so a renewed
certificate (a cert-manager Secret update, a ``mv`` into place) serves new connections without
a restart. Connections already open keep the certificate they were made with.

A pair that does not load (a key that does not match its certificate, a file half written) is
refused with a WARNING and the previous pair keeps serving; at start-up it is a
:class:`TlsError` naming the flag.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

FileToken = tuple[int, int, int, int] | None
"""(device, inode, size, mtime in ns) of a file, None when it cannot be read."""


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the flag."""


def file_token(path: Path) -> FileToken:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_file(path: Path, option: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TlsError(f"{option} {path}: cannot read ({e.strerror or e})") from e
    if b"-----BEGIN" not in data:
        raise TlsError(f"{option} {path}: expected a PEM file (-----BEGIN ...)")
    return data


def check_pair(cert: Path, key: Path) -> None:
    """Whether ``key`` is the private key of ``cert`` (the ssl module checks it on load)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise TlsError(
            f"--tls-cert {cert} / --tls-key {key}: not a matching certificate and key ({e})"
        ) from e


def check_ca(ca: Path, option: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"{option} {ca}: not a CA certificate file ({e})") from e


@dataclass(frozen=True)
class LoadedPair:
    tokens: tuple[FileToken, ...]
    config: grpc.ServerCertificateConfiguration


class CertificateFiles:
    """The server's certificate, key and (for mutual TLS) client CA, reloaded on change."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert = cert
        self.key = key
        self.client_ca = client_ca
        self.reloads = 0
        """How many times new files were handed to gRPC after the first load."""
        self.refused = 0
        """How many changed sets of files were refused (the previous ones kept serving)."""
        self._lock = threading.Lock()  # gRPC may call fetch from more than one thread
        self._loaded = self._load()
        self._refused_tokens: tuple[FileToken, ...] | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def _paths(self) -> tuple[Path, ...]:
        extra = () if self.client_ca is None else (self.client_ca,)
        return (self.cert, self.key, *extra)

    def _load(self) -> LoadedPair:
        tokens = tuple(file_token(p) for p in self._paths())
        cert = read_file(self.cert, "--tls-cert")
        key = read_file(self.key, "--tls-key")
        check_pair(self.cert, self.key)
        ca = None
        if self.client_ca is not None:
            ca = read_file(self.client_ca, "--tls-client-ca")
            check_ca(self.client_ca, "--tls-client-ca")
        config = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
        return LoadedPair(tokens, config)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that ask :meth:`fetch` for changes at every new connection."""
        # grpc-stubs types the fetcher's result without None; gRPC documents None as "unchanged".
        fetch: Any = self.fetch
        return grpc.dynamic_ssl_server_credentials(
            self._loaded.config, fetch, require_client_authentication=self.mutual
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-configuration fetcher: a new configuration when the files
        changed and load, else None (keep the current one). Never raises: an exception here
        would fail the handshake of the connection being made."""
        try:
            tokens = tuple(file_token(p) for p in self._paths())
            with self._lock:
                if tokens == self._loaded.tokens or tokens == self._refused_tokens:
                    return None
                try:
                    loaded = self._load()
                except TlsError as e:
                    self._refused_tokens = tokens
                    self.refused += 1
                    log.warning("TLS: changed files refused, the previous ones keep serving: %s", e)
                    return None
                self._loaded = loaded
                self._refused_tokens = None
                self.reloads += 1
            log.info("TLS: reloaded %s (new connections use it)", self.cert)
            return loaded.config
        except Exception:  # a bug here must not break every new connection
            log.exception("TLS: checking the certificate files failed; keeping the current ones")
            return None


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> CertificateFiles | None:
    """The TLS configuration the flags ask for; None for plaintext. Raises :class:`TlsError`."""
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
        return None
    if cert is None or key is None:
        missing = "--tls-cert" if cert is None else "--tls-key"
        raise TlsError(f"{missing} is missing; TLS needs both --tls-cert and --tls-key")
    return CertificateFiles(cert, key, client_ca)


def channel_credentials(
    ca: Path | None, client_cert: Path | None = None, client_key: Path | None = None
) -> grpc.ChannelCredentials:
    """Client credentials: trust ``ca`` (None: the system's roots), and present a client
    certificate when the server asks for one (mutual TLS). Raises :class:`TlsError`."""
    if (client_cert is None) != (client_key is None):
        raise TlsError("--tls-client-cert and --tls-client-key go together: give both or neither")
    root = read_file(ca, "--tls-ca") if ca is not None else None
    cert = read_file(client_cert, "--tls-client-cert") if client_cert is not None else None
    key = read_file(client_key, "--tls-client-key") if client_key is not None else None
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=cert
    )
