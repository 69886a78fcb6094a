"""The layering of the code, read from its imports (including those inside functions).

The contracts live in pyproject.toml ([tool.importlinter]): composition root > serving >
pipeline > domain packages (independent of each other) > core, and a core that imports nothing
above it. On top of that, no import circle anywhere under ``recsys``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_no_module_imports_itself_back_through_another() -> None:
    graph = grimp.build_graph("recsys", cache_dir=None)
    circles = sorted(
        (importer, imported)
        for importer in graph.modules
        for imported in graph.find_modules_directly_imported_by(importer)
        if imported != importer
        and not importer.startswith(imported + ".")  # a package's __init__ is not a circle
        and not imported.startswith(importer + ".")
        and graph.chain_exists(importer=imported, imported=importer)
    )
    assert circles == [], "import circles (a -> b and b leads back to a): " + repr(circles)
