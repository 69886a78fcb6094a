"""The one pattern for every name and version that becomes a path (docs/security.md).

Model names and versions, index, features and world versions (recsys/artifacts.py), control
document names (recsys/control/store.py) and log file prefixes (recsys/linelog/files.py) all
become a file or directory name. Each must be a single path component without dots or slashes,
so none can name a place outside its own directory. This module sits below every other so that
each of them checks against the same pattern; each raises its own error, naming its field.
"""

from __future__ import annotations

import re

ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
"""Must match whole (``fullmatch``)."""
ID_EXPECTED = (
    "a name of 1 to 64 lowercase letters, digits, '_' or '-', starting with a letter or digit"
)
"""What :data:`ID_PATTERN` accepts, in words, for error messages."""


def is_id(value: object) -> bool:
    """Whether ``value`` is a string matching :data:`ID_PATTERN` whole."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None
