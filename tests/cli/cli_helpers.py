"""Running ``recsys`` commands in-process and reading what they stored, for the CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.cli.main import main
from recsys.control.backends import open_store


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``recsys ARGV...``: its exit code, stdout and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def stored_routing(artifacts: Path) -> dict[str, object]:
    """The routing document's body in the file control store of ``artifacts``."""
    store = open_store("", artifacts)
    try:
        document = store.read("routing")
    finally:
        store.close()
    assert document is not None
    return dict(document.body)
