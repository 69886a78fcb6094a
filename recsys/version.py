"""The code version: what a serving snapshot or a trained model names as the code it ran."""

from __future__ import annotations

import hashlib
import importlib.metadata
from functools import cache
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent


@cache
def code_version() -> str:
    """``<package version>+src.<12 hex digits>``: the installed version and a hash over every
    Python source file of the package, so two checkouts that differ in any line differ here.
    Computed once per process (about a megabyte of source), on first use."""
    try:
        package = importlib.metadata.version("recsys")
    except importlib.metadata.PackageNotFoundError:
        package = "0+unknown"
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\0")
        digest.update(path.read_bytes())
    return f"{package}+src.{digest.hexdigest()[:12]}"
