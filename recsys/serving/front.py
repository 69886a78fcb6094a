"""The admission front: HAProxy in front of the gRPC port, refusing by time in native code.

A Python gRPC server cannot bound the time an admitted call waits: gRPC core queues calls the
event loop has not picked up yet, its bound on them counts calls, not time, and the loop only
sees a call once it has taken it from core (benchmarks/README.md, "Overload"). The front moves
that queue in front of the server, into HAProxy (a field-standard proxy, native code, HTTP/2 on
both sides):

- each backend (a worker's port) is given at most ``max_in_flight`` calls at once, so the
  server's own queues stay short and its latency near the unloaded one;
- the rest wait in HAProxy's queue, in arrival order, for at most ``max_queue_ms``; a call that
  has not reached a backend by then is answered RESOURCE_EXHAUSTED at once (HTTP 503 carrying
  ``grpc-status: 8``, which gRPC clients report as RESOURCE_EXHAUSTED), without the server
  spending anything on it.

So an admitted call waits at most ``max_queue_ms`` before the server, a refused one is answered
in ``max_queue_ms`` plus HAProxy's own microseconds, and a burst shorter than ``max_queue_ms``
is queued, not refused, however many calls it holds: the bound judges time, not count.

Which backend a call goes to (``balance``):

- ``user`` (the default): to the backend a hash of the call's user header names
  (serving/routing.py), so the refreshes of one user's feed reach the worker whose result cache
  holds it, while that backend has a free slot of its ``max_in_flight``. When it has none, or
  the call has no header, the call goes to the backend with the fewest calls in flight, as with
  ``leastconn``: a full worker's users are served by another rather than refused, and a heavy
  user cannot hold more than one worker's slots. (HAProxy's own hash balancing with bounded
  loads queued such calls on the full worker and refused them after ``max_queue_ms``: its
  bound compares a worker with the average, not with its slots; benchmarks/README.md,
  "Thirteenth round".) The hash is the header's CRC32 modulo the number of backends: a pod's
  workers are fixed for its life, and between pods the clients hash consistently.
- ``leastconn``: to the backend with the fewest calls in flight, whoever the user.

Calls the front refuses never reach a server, so the servers' metrics cannot count them. With
``metrics`` set, HAProxy's own Prometheus exporter (built into Debian's HAProxy) serves
``/metrics`` on that address: requests and responses by class (a refusal is a 5xx; a gRPC error
from a server is HTTP 200), the queue, each backend's calls in flight and the time calls waited
for one (docs/operations.md, "The admission front's metrics").

``recsys front`` runs it (cli/front.py); ``haproxy_config`` renders the configuration, so the
one the pods run is the one the tests and benchmarks run.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from recsys.serving.routing import USER_HEADER

log = logging.getLogger(__name__)

HAPROXY = "haproxy"
HARD_STOP_SECONDS = 20
"""After a soft stop, HAProxy closes whatever connections are still open this long after."""
SHED_MESSAGE = "recsys front: no server capacity within the queue bound"
"""The grpc-message of a refusal by the front (queue wait over the bound, or no backend up)."""

BALANCES = ("user", "leastconn")

_HOST = re.compile(r"^[A-Za-z0-9.:\-\[\]]+$")


class FrontError(ValueError):
    """A front setting that cannot be used (names the setting and what was expected)."""


@dataclass(frozen=True)
class Backend:
    host: str
    port: int

    @property
    def address(self) -> str:
        """``HOST:PORT`` as HAProxy reads it (an IPv6 host in brackets)."""
        return _address(self.host, self.port)


@dataclass(frozen=True)
class FrontSettings:
    listen_host: str
    listen_port: int
    backends: tuple[Backend, ...]
    max_in_flight: int
    """Calls given to each backend at once."""
    max_queue_ms: int
    """How long a call may wait in the front for a backend before it is refused."""
    max_queued: int = 0
    """Calls that may wait in the front at once; a call that finds this many waiting is
    refused at once (0: no bound but the time)."""
    metrics: Backend | None = None
    """Where HAProxy's Prometheus exporter serves ``/metrics`` (plain HTTP/1.1); None: nowhere."""
    balance: str = "user"
    """How a call's backend is chosen: ``user`` (hash of the user header) or ``leastconn``."""

    def __post_init__(self) -> None:
        metrics = () if self.metrics is None else (self.metrics,)
        for setting, host in (
            ("listen host", self.listen_host),
            *(("backend host", b.host) for b in self.backends),
            *(("metrics host", m.host) for m in metrics),
        ):
            if not _HOST.fullmatch(host):
                raise FrontError(f"front {setting} {host!r}: expected a host name or IP address")
        for setting, port in (
            ("listen port", self.listen_port),
            *(("backend port", b.port) for b in self.backends),
            *(("metrics port", m.port) for m in metrics),
        ):
            if not 1 <= port <= 65535:
                raise FrontError(f"front {setting} {port}: expected 1-65535")
        if not self.backends:
            raise FrontError("front backends: expected at least one HOST:PORT")
        if self.max_in_flight < 1:
            raise FrontError(f"front max_in_flight {self.max_in_flight}: expected >= 1")
        if self.max_queue_ms < 1:
            raise FrontError(f"front max_queue_ms {self.max_queue_ms}: expected >= 1")
        if self.max_queued < 0:
            raise FrontError(f"front max_queued {self.max_queued}: expected >= 0 (0: no bound)")
        if self.balance not in BALANCES:
            raise FrontError(
                f"front balance {self.balance!r}: expected one of {', '.join(BALANCES)}"
            )


def parse_backend(text: str, setting: str = "backend") -> Backend:
    """``HOST:PORT`` (an IPv6 host in brackets); ``setting`` names it in the error."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise FrontError(f"front {setting} {text!r}: expected HOST:PORT")
    return Backend(host.strip("[]"), int(port))


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def haproxy_config(settings: FrontSettings) -> str:
    """The HAProxy configuration of ``settings``."""
    servers = "\n".join(
        f"    server w{i} {b.address} proto h2 maxconn {settings.max_in_flight}"
        for i, b in enumerate(settings.backends)
    )
    refusal = f'hdr grpc-status 8 hdr grpc-message "{SHED_MESSAGE}"'
    queued = ""
    if settings.max_queued:  # refused at once when that many already wait
        full = f"{{ queue(recsys) ge {settings.max_queued} }}"
        queued = f"    http-request return status 503 {refusal} if {full}\n"
    metrics = ""
    if settings.metrics is not None:
        metrics = f"""
frontend metrics
    bind {settings.metrics.address}
    no log
    timeout client 10s
    http-request use-service prometheus-exporter if {{ path /metrics }}
    http-request return status 404
"""
    return f"""\
global
    nbthread 1
    hard-stop-after {HARD_STOP_SECONDS}s
    log stderr format raw local0 warning

defaults
    mode http
    log global
    timeout connect 1s
    # gRPC connections are long-lived and may idle between calls.
    timeout client 1h
    timeout server 60s
    # The bound: a call waits at most this long for a backend slot, then is refused.
    timeout queue {settings.max_queue_ms}ms
    http-reuse always

frontend grpc
    bind {_address(settings.listen_host, settings.listen_port)} proto h2
{queued}    default_backend recsys

backend recsys
{_balance(settings)}
    http-error status 503 {refusal}
{servers}
{metrics}"""


def _balance(settings: FrontSettings) -> str:
    lines = ["    balance leastconn"]
    if settings.balance == "user":  # the user's backend while it has a free slot
        workers = len(settings.backends)
        lines.append(
            f"    http-request set-var(txn.worker) req.hdr({USER_HEADER}),crc32,mod({workers})"
        )
        lines += [
            f"    use-server w{i} if {{ var(txn.worker) -m int {i} }} "
            f"{{ srv_conn(recsys/w{i}) lt {settings.max_in_flight} }}"
            for i in range(workers)
        ]
    return "\n".join(lines)


def haproxy_path() -> str:
    path = shutil.which(HAPROXY)
    if path is None:
        raise FrontError(
            "front: the haproxy program was not found on PATH "
            "(Debian/Ubuntu: apt-get install haproxy; the container image has it)"
        )
    return path


def write_config(settings: FrontSettings, config_dir: Path) -> Path:
    """Write the configuration of ``settings`` under ``config_dir`` and check it with
    ``haproxy -c``; raises :class:`FrontError` (one line) if HAProxy refuses it."""
    config = config_dir / "haproxy.cfg"
    config.write_text(haproxy_config(settings))
    check = subprocess.run(
        [haproxy_path(), "-c", "-q", "-f", str(config)], capture_output=True, text=True
    )
    if check.returncode != 0:
        first = (check.stderr.strip().splitlines() or ["(no output)"])[0]
        raise FrontError(f"front: haproxy refused the configuration: {first}")
    return config


def start_front(
    settings: FrontSettings, config_dir: Path, *, prefix: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """Write and check the configuration (:func:`write_config`) and start HAProxy on it in the
    foreground (``-db``), after ``prefix`` (e.g. ``taskset -c 0``): the caller owns the process
    (SIGUSR1: stop listening and finish the calls in flight; SIGTERM: stop now)."""
    config = write_config(settings, config_dir)
    return subprocess.Popen([*prefix, haproxy_path(), "-db", "-f", str(config)])


def serve_front(settings: FrontSettings, config_dir: Path, grace_seconds: float) -> int:
    """Run HAProxy until SIGTERM or SIGINT; returns the exit code.

    On the signal the front keeps forwarding for ``grace_seconds`` (the servers behind it turn
    NOT_SERVING and keep serving as long, so load balancers move away first), then soft-stops
    HAProxy (SIGUSR1: no new connections, the calls in flight finish) and waits for it.
    HAProxy exiting on its own is an error (exit code 1), so the supervisor restarts the pod.
    """
    stopping = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    # Handlers first: a signal while HAProxy starts is a stop, not the end of this process
    # with HAProxy left running.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    process: subprocess.Popen[bytes] | None = None
    try:
        process = start_front(settings, config_dir)
        log.info(
            "recsys front on %s:%d: %d backends by %s, at most %d calls in each, %d ms in the "
            "queue; metrics %s",
            settings.listen_host,
            settings.listen_port,
            len(settings.backends),
            settings.balance,
            settings.max_in_flight,
            settings.max_queue_ms,
            "none" if settings.metrics is None else f"http://{settings.metrics.address}/metrics",
        )
        while not stopping.wait(0.2):
            if process.poll() is not None:
                log.error("recsys front: haproxy exited with %s", process.returncode)
                return 1
        log.info("recsys front stopping: forwarding for %.1f s more, then draining", grace_seconds)
        if _exited(process, grace_seconds):
            log.error("recsys front: haproxy exited with %s", process.returncode)
            return 1
        process.send_signal(signal.SIGUSR1)  # soft stop
        process.wait(timeout=HARD_STOP_SECONDS + 10)
        log.info("recsys front stopped")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


def _exited(process: subprocess.Popen[bytes], seconds: float) -> bool:
    """Whether ``process`` exits within ``seconds``."""
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return False
    return True
