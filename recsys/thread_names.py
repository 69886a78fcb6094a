"""The server's own threads under their names in the operating system.

Python names its threads for itself only: ``top -H``, ``/proc/PID/task/*/comm``, ``perf`` and
the throughput benchmark's per-thread CPU all see every one of them as the process's name. A
thread that calls :func:`name_os_thread` first is shown under its Python name instead (Linux
keeps 15 bytes of it), so the batch threads (``batch-recommend``), the exposure writer and the
event loop's thread (the process's first) can be told apart from outside the process.
"""

from __future__ import annotations

import ctypes
import sys
import threading

OS_NAME_BYTES = 15
"""Linux keeps the first 15 bytes of a thread's name (16 with the terminating zero)."""
_PR_SET_NAME = 15


def os_thread_name(name: str) -> bytes:
    """``name`` as the operating system keeps it: ASCII, at most 15 bytes."""
    return name.encode("ascii", "replace")[:OS_NAME_BYTES]


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread ``name`` (default: its Python name) in the operating system.
    Linux only; elsewhere, or if the call fails, the thread keeps the process's name."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NAME, os_thread_name(name or threading.current_thread().name), 0, 0, 0)
