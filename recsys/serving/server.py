"""Server lifecycle: bind, load, serve, drain.

Start: the metrics endpoint and the gRPC port come up first with health NOT_SERVING (so probes
and grpcurl work while artifacts load), then the pipeline opens, then health turns SERVING. A
worker of ``recsys serve --workers N`` (``reuse_port``) binds the shared port only once it
serves, so its siblings take every connection meanwhile.

Stop (SIGTERM/SIGINT or :meth:`RunningServer.stop`): health NOT_SERVING at once; on a signal,
Recommend is still served for ``shutdown_grace_seconds`` so load balancers and Kubernetes
endpoints notice and stop sending; then new Recommend calls get UNAVAILABLE (clients retry
elsewhere; health checks keep answering), in-flight calls finish within ``drain_seconds`` (any
still running then answer UNAVAILABLE, never CANCELLED), and the drain lasts until no call has
arrived for :data:`DRAIN_QUIET_SECONDS` (gRPC cancels the calls it still holds for a handler
when it stops), then the gRPC server stops, the exposure log is flushed, the pipeline closed and
the metrics endpoint shut.

Health port (``health_port``, -1: off): a second gRPC server on the same event loop serving only
the health service (the same servicer, so the same status), plaintext (kubelet probes cannot do
TLS) and without the admission bounds (``max_concurrent_rpcs``, ``max_pending_rpcs``), so probes
are answered while the main port sheds load. It stops after the main server, so it answers
NOT_SERVING throughout the grace and the drain.

A port that cannot be bound raises :class:`BindError` naming the setting and the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from recsys.serving.exposure import ExposureSink, LineWriter, open_exposure_writer
from recsys.serving.gc_tuning import GcPauses, freeze_loaded_heap
from recsys.serving.metrics import ServingMetrics
from recsys.serving.rest import RECOMMEND_PATH, RestServer
from recsys.serving.servicer import RECOMMENDER_SERVICE, RecommenderService, add_to_server
from recsys.serving.tls import CertificateFiles, server_credentials
from recsys.settings import ServeSettings

if TYPE_CHECKING:
    from recsys.serving.pipeline import RecommendPipeline

log = logging.getLogger(__name__)

__all__ = ["RECOMMENDER_SERVICE", "BindError", "RunningServer", "run", "serve"]

HEALTH_SERVICES = ("", RECOMMENDER_SERVICE)
RESPONSE_WRITE_GRACE_SECONDS = 1.0
DRAIN_QUIET_SECONDS = 0.5
"""The drain ends once no Recommend call has arrived for this long (and none is running):
stopping the gRPC server drops the calls it has queued for a handler, as CANCELLED."""
STOP_GRACE_SECONDS = 5.0
"""Grace of the final ``server.stop``: a call that slipped in after the drain is refused at
once, and the stop returns as soon as no call is left, so a long grace costs nothing."""

# grpc-stubs describes only the sync health servicer; this is grpcio-health-checking's aio one.
AsyncHealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]

OpenPipeline: TypeAlias = "Callable[[ServeSettings, ServingMetrics], Awaitable[RecommendPipeline]]"


class BindError(RuntimeError):
    """A port of the settings (``port``, ``metrics_port``, ``http_port`` or ``health_port``)
    could not be bound."""

    def __init__(self, setting: str, host: str, port: int, reason: str) -> None:
        super().__init__(f"cannot bind {setting} {host}:{port}: {reason}")
        self.setting = setting
        self.host = host
        self.port = port
        self.reason = reason

    @property
    def option(self) -> str:
        """The command-line flag of the setting."""
        return f"--{self.setting.replace('_', '-')}"


def bind_failure_reason(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound, found by trying as gRPC does (``SO_REUSEADDR``, so a
    port in TIME_WAIT after a restart counts as free); None if it can be. gRPC itself only says
    that binding failed, after logging a line of its own to stderr."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return "address already in use"
        return e.strerror or str(e)
    return None


def grpc_options(settings: ServeSettings) -> list[tuple[str, int]]:
    """gRPC core's server options. One process owns the port: SO_REUSEPORT would let a stale
    server share it silently (worker processes of `recsys serve --workers N` share it on
    purpose, serving/workers.py). Calls waiting for the event loop are bounded in the core
    (``max_pending_rpcs``: refused at random above it, always at twice it)."""
    options = [("grpc.so_reuseport", 1 if settings.reuse_port else 0)]
    if settings.max_pending_rpcs:
        options += [
            ("grpc.server.max_pending_requests", settings.max_pending_rpcs),
            ("grpc.server.max_pending_requests_hard_limit", 2 * settings.max_pending_rpcs),
        ]
    return options


def add_port(server: grpc.aio.Server, address: str, tls: CertificateFiles | None) -> int:
    """Listen on ``address``: TLS (mutual when a client CA is set) or, without it, plaintext."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.credentials())


def describe_tls(tls: CertificateFiles | None) -> str:
    if tls is None:
        return "plaintext: no --tls-cert"
    return "mutual TLS" if tls.mutual else "TLS"


class RunningServer:
    """A started server: bound ports, health, metrics; :meth:`stop` drains and releases."""

    def __init__(
        self,
        settings: ServeSettings,
        server: grpc.aio.Server,
        port: int,
        metrics: ServingMetrics,
        metrics_port: int,
        health: Any,
        service: RecommenderService,
        exposures: ExposureSink,
        tls: CertificateFiles | None = None,
    ) -> None:
        self.settings = settings
        self.tls = tls
        """The port's certificate files (None: plaintext), reloaded when they change."""
        self.port = port
        self.metrics = metrics
        self.metrics_port = metrics_port
        self.exposures = exposures
        self._server = server
        self._health = health
        self._service = service
        self._gc_pauses = GcPauses(metrics.observe_gc_pause)
        self._gc_pauses.install()
        self._opening: asyncio.Task[RecommendPipeline] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.rest: RestServer | None = None
        """The HTTP/JSON endpoint when ``http_port`` is not -1 (serving/rest.py)."""
        self.http_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        """The health-only server when ``health_port`` is not -1."""
        self.health_port: int | None = None

    @classmethod
    async def start(
        cls,
        settings: ServeSettings,
        open_pipeline: OpenPipeline,
        *,
        exposure_writer: LineWriter | None = None,
    ) -> RunningServer:
        """Bind both ports (NOT_SERVING) and begin opening the pipeline in the background.

        The exposure log goes where the settings say (rotating files in the exposure directory,
        or a Redis Stream: :func:`~recsys.serving.exposure.open_exposure_writer`) unless
        ``exposure_writer`` is given.
        """
        tls = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
        writer = exposure_writer or open_exposure_writer(settings)
        metrics = ServingMetrics()
        metrics_host = settings.metrics_host or settings.host
        try:
            metrics_port = metrics.start_http(metrics_host, settings.metrics_port)
        except OSError as e:
            writer.close()
            why = "address already in use" if e.errno == errno.EADDRINUSE else str(e)
            raise BindError("metrics_port", metrics_host, settings.metrics_port, why) from e
        except Exception:
            writer.close()
            raise
        exposures = ExposureSink(writer, queue_size=settings.exposure_queue_size, observer=metrics)
        exposures.start()
        service = RecommenderService(metrics, exposures, max_in_flight=settings.max_in_flight)
        server = grpc.aio.server(
            options=grpc_options(settings),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
        )
        add_to_server(service, server)
        health = AsyncHealthServicer()
        for name in HEALTH_SERVICES:
            await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            (
                RECOMMENDER_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            if settings.reuse_port:
                # A worker sharing the port binds it only once it can serve: the kernel hands
                # connections to listening sockets only, so none reach a worker still loading.
                port = settings.port
            else:
                reason = (
                    bind_failure_reason(settings.host, settings.port) if settings.port else None
                )
                if reason is not None:
                    raise BindError("port", settings.host, settings.port, reason)
                try:
                    port = add_port(server, f"{settings.host}:{settings.port}", tls)
                except RuntimeError as e:  # taken since the probe, or a reason gRPC alone sees
                    reason = bind_failure_reason(settings.host, settings.port) or "cannot bind"
                    raise BindError("port", settings.host, settings.port, reason) from e
                await server.start()
        except Exception:
            await exposures.close()
            await asyncio.to_thread(metrics.stop_http)
            raise
        running = cls(
            settings, server, port, metrics, metrics_port, health, service, exposures, tls
        )
        if not settings.reuse_port:
            try:
                if settings.health_port >= 0:
                    await running._start_health()
                if settings.http_port >= 0:
                    await running._start_rest()
            except BaseException:
                await running.stop()
                raise
        running._opening = asyncio.get_running_loop().create_task(
            running._open(open_pipeline), name="open-pipeline"
        )
        log.info(
            "recsys listening on %s:%d (%s; metrics on %s:%d), loading the pipeline",
            settings.host,
            port,
            describe_tls(tls),
            metrics_host,
            metrics_port,
        )
        return running

    async def _open(self, open_pipeline: OpenPipeline) -> RecommendPipeline:
        try:
            pipeline = await open_pipeline(self.settings, self.metrics)
        except Exception:
            log.exception("opening the pipeline failed; health stays NOT_SERVING")
            raise
        freeze_loaded_heap(self.settings.gc_gen0_threshold)  # before traffic: it stalls
        self._service.attach(pipeline)
        for name in HEALTH_SERVICES:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.reuse_port:
            add_port(self._server, f"{self.settings.host}:{self.port}", self.tls)
            await self._server.start()
            if self.settings.health_port >= 0:
                await self._start_health()
            if self.settings.http_port >= 0:
                await self._start_rest()
        log.info("recsys serving on %s:%d", self.settings.host, self.port)
        return pipeline

    async def _start_rest(self) -> None:
        rest = RestServer(self._service)
        host, port = self.settings.host, self.settings.http_port
        try:
            self.http_port = await rest.start(host, port, reuse_port=self.settings.reuse_port)
        except OSError as e:
            await rest.stop()
            why = "address already in use" if e.errno == errno.EADDRINUSE else str(e)
            raise BindError("http_port", host, port, why) from e
        self.rest = rest
        log.info("recsys HTTP/JSON on %s:%d%s", host, self.http_port, RECOMMEND_PATH)

    async def _start_health(self) -> None:
        """The health-only listener: no admission bounds, plaintext (for kubelet probes)."""
        host, port = self.settings.host, self.settings.health_port
        reason = None if self.settings.reuse_port or not port else bind_failure_reason(host, port)
        if reason is not None:
            raise BindError("health_port", host, port, reason)
        server = grpc.aio.server(options=[("grpc.so_reuseport", int(self.settings.reuse_port))])
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError as e:  # taken since the probe, or a reason gRPC alone sees
            raise BindError("health_port", host, port, "cannot bind") from e
        await server.start()
        self._health_server, self.health_port = server, bound
        log.info("recsys health (plaintext, no admission bounds) on %s:%d", host, bound)

    async def wait_ready(self) -> None:
        """Wait until the pipeline is open and health is SERVING; raises if opening failed."""
        assert self._opening is not None
        await asyncio.shield(self._opening)

    async def stop(self, grace_seconds: float = 0.0) -> None:
        """Drain and release everything; safe to call more than once.

        Health turns NOT_SERVING at once; Recommend is still served for ``grace_seconds``
        (:func:`serve` passes ``shutdown_grace_seconds`` on a signal) before the drain starts.
        """
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(
                self._stop(grace_seconds), name="drain"
            )
        await asyncio.shield(self._stopping)

    async def _stop(self, grace_seconds: float) -> None:
        await self._health.enter_graceful_shutdown()
        if grace_seconds > 0 and self._service.attached:
            log.info(
                "shutdown: health NOT_SERVING; still serving for %.1fs so load balancers notice",
                grace_seconds,
            )
            await asyncio.sleep(grace_seconds)
        self._service.start_draining()
        pipeline = await self._cancel_opening()
        try:
            # Idle is not enough: calls gRPC has accepted but not yet handed to a handler are
            # invisible here, and server.stop would cancel them; wait until calls stop coming.
            async with asyncio.timeout(self.settings.drain_seconds):
                await self._service.wait_quiet(DRAIN_QUIET_SECONDS)
        except TimeoutError:
            if self._service.in_flight:
                log.warning(
                    "drain: %d Recommend calls still running after %.1fs; "
                    "answering them UNAVAILABLE",
                    self._service.in_flight,
                    self.settings.drain_seconds,
                )
                self._service.abandon_in_flight()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RESPONSE_WRITE_GRACE_SECONDS):
                        await self._service.wait_idle()
            else:
                log.warning(
                    "drain: Recommend calls still arriving after %.1fs; stopping anyway",
                    self.settings.drain_seconds,
                )
        # Handlers have returned; the grace lets gRPC write their answers and lets a call that
        # arrives meanwhile be refused UNAVAILABLE rather than cancelled.
        await self._server.stop(STOP_GRACE_SECONDS)
        if self._health_server is not None:  # NOT_SERVING until the main port is gone
            await self._health_server.stop(0)
        if self.rest is not None:
            await self.rest.stop()
        # The metrics endpoint takes up to half a second to stop: let it do so meanwhile.
        metrics_stopped = asyncio.ensure_future(asyncio.to_thread(self.metrics.stop_http))
        try:
            await self.exposures.close()
            if pipeline is not None:
                await pipeline.close()
        finally:
            await metrics_stopped
            self._gc_pauses.remove()
        log.info("recsys stopped")

    async def _cancel_opening(self) -> RecommendPipeline | None:
        """The open pipeline, or None after cancelling (or seeing the failure of) the open."""
        opening = self._opening
        if opening is None:
            return None
        if not opening.done():
            opening.cancel()
        try:
            return await opening
        except asyncio.CancelledError:
            return None
        except Exception:  # already raised to whoever awaited wait_ready
            return None


async def serve(settings: ServeSettings, open_pipeline: OpenPipeline) -> None:
    """Run until SIGTERM or SIGINT, then drain and return (the process exits 0)."""
    server = await RunningServer.start(settings, open_pipeline)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop_requested.set)
    ready = asyncio.ensure_future(server.wait_ready())
    stopping = asyncio.ensure_future(stop_requested.wait())
    try:
        await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            ready.result()  # raises if the pipeline failed to open
            await stopping
        log.info("recsys: stop requested, draining")
    finally:
        ready.cancel()
        stopping.cancel()
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.stop(settings.shutdown_grace_seconds)


def run(settings: ServeSettings, open_pipeline: OpenPipeline) -> None:
    """Serve on a uvloop event loop."""
    uvloop.run(serve(settings, open_pipeline))
