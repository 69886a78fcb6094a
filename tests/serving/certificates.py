"""Real X.509 certificates for the TLS tests, made with the openssl command line.

A test CA signs a server certificate for ``localhost`` / ``127.0.0.1`` and a client
certificate; each call makes fresh keys, so two authorities never trust each other's leaves.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Authority:
    """A CA and the leaves it signed, as PEM files in ``directory``."""

    directory: Path
    name: str

    @property
    def ca(self) -> Path:
        return self.directory / f"{self.name}-ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / f"{self.name}-ca.key"

    def leaf(self, leaf: str, *, server: bool) -> tuple[Path, Path]:
        """A certificate and key signed by this CA: ``(cert, key)``."""
        cert = self.directory / f"{self.name}-{leaf}.pem"
        key = self.directory / f"{self.name}-{leaf}.key"
        csr = self.directory / f"{self.name}-{leaf}.csr"
        extensions = self.directory / f"{self.name}-{leaf}.ext"
        if server:
            extensions.write_text(
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
            )
        else:
            extensions.write_text("extendedKeyUsage=clientAuth\n")
        openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={leaf}",
            cwd=self.directory,
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(self.ca_key),
            "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(extensions),
            cwd=self.directory,
        )  # fmt: skip
        return cert, key


def make_authority(directory: Path, name: str) -> Authority:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed; cannot make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    authority = Authority(directory, name)
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(authority.ca_key), "-out", str(authority.ca), "-days", "2",
        "-subj", f"/CN={name} test CA",
        cwd=directory,
    )  # fmt: skip
    return authority
