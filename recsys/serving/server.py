"""Server lifecycle: bind, load, serve, drain.

Start: the metrics endpoint and the gRPC port come up first with health NOT_SERVING (so probes
and grpcurl work while artifacts load), then the pipeline opens, then health turns SERVING. A
worker of ``recsys serve --workers N`` (``reuse_port``) binds the shared port only once it
serves, so its siblings take every connection meanwhile.

Stop (SIGTERM/SIGINT or :meth:`RunningServer.stop`): health NOT_SERVING, new Recommend calls
get UNAVAILABLE (clients retry elsewhere; health checks keep answering), in-flight calls finish
within ``drain_seconds``, then the gRPC server stops, the exposure log is flushed, the pipeline
closed and the metrics endpoint shut.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from recsys.serving.exposure import ExposureSink, LineWriter, open_exposure_writer
from recsys.serving.metrics import ServingMetrics
from recsys.serving.servicer import RecommenderService
from recsys.settings import ServeSettings
from recsys.v1 import recommender_pb2, recommender_pb2_grpc

if TYPE_CHECKING:
    from recsys.serving.pipeline import RecommendPipeline

log = logging.getLogger(__name__)

RECOMMENDER_SERVICE: str = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
HEALTH_SERVICES = ("", RECOMMENDER_SERVICE)
RESPONSE_WRITE_GRACE_SECONDS = 1.0

# grpc-stubs describes only the sync health servicer; this is grpcio-health-checking's aio one.
AsyncHealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]

OpenPipeline: TypeAlias = "Callable[[ServeSettings, ServingMetrics], Awaitable[RecommendPipeline]]"


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
    ) -> None:
        self.settings = settings
        self.port = port
        self.metrics = metrics
        self.metrics_port = metrics_port
        self.exposures = exposures
        self._server = server
        self._health = health
        self._service = service
        self._opening: asyncio.Task[RecommendPipeline] | None = None
        self._stopping: asyncio.Task[None] | None = None

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
        writer = exposure_writer or open_exposure_writer(settings)
        metrics = ServingMetrics()
        try:
            metrics_port = metrics.start_http(
                settings.metrics_host or settings.host, settings.metrics_port
            )
        except Exception:
            writer.close()
            raise
        exposures = ExposureSink(writer, queue_size=settings.exposure_queue_size, observer=metrics)
        exposures.start()
        service = RecommenderService(metrics, exposures, max_in_flight=settings.max_in_flight)
        # One process owns the port: SO_REUSEPORT would let a stale server share it silently.
        # Worker processes of `recsys serve --workers N` share it on purpose (serving/workers.py).
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if settings.reuse_port else 0)])
        recommender_pb2_grpc.add_RecommenderServicer_to_server(service, server)
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
                port = server.add_insecure_port(f"{settings.host}:{settings.port}")
                await server.start()
        except Exception:
            await exposures.close()
            await asyncio.to_thread(metrics.stop_http)
            raise
        running = cls(settings, server, port, metrics, metrics_port, health, service, exposures)
        running._opening = asyncio.get_running_loop().create_task(
            running._open(open_pipeline), name="open-pipeline"
        )
        log.info(
            "recsys listening on %s:%d (metrics on :%d), loading the pipeline",
            settings.host,
            port,
            metrics_port,
        )
        return running

    async def _open(self, open_pipeline: OpenPipeline) -> RecommendPipeline:
        try:
            pipeline = await open_pipeline(self.settings, self.metrics)
        except Exception:
            log.exception("opening the pipeline failed; health stays NOT_SERVING")
            raise
        self._service.attach(pipeline)
        for name in HEALTH_SERVICES:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.reuse_port:
            self._server.add_insecure_port(f"{self.settings.host}:{self.port}")
            await self._server.start()
        log.info("recsys serving on %s:%d", self.settings.host, self.port)
        return pipeline

    async def wait_ready(self) -> None:
        """Wait until the pipeline is open and health is SERVING; raises if opening failed."""
        assert self._opening is not None
        await asyncio.shield(self._opening)

    async def stop(self) -> None:
        """Drain and release everything; safe to call more than once."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(), name="drain")
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        await self._health.enter_graceful_shutdown()
        self._service.start_draining()
        pipeline = await self._cancel_opening()
        try:
            async with asyncio.timeout(self.settings.drain_seconds):
                await self._service.wait_idle()
        except TimeoutError:
            log.warning(
                "drain: %d Recommend calls still running after %.1fs; cancelling them",
                self._service.in_flight,
                self.settings.drain_seconds,
            )
        # Handlers have returned; a short grace lets gRPC write the answers they returned.
        await self._server.stop(RESPONSE_WRITE_GRACE_SECONDS)
        # The metrics endpoint takes up to half a second to stop: let it do so meanwhile.
        metrics_stopped = asyncio.ensure_future(asyncio.to_thread(self.metrics.stop_http))
        try:
            await self.exposures.close()
            if pipeline is not None:
                await pipeline.close()
        finally:
            await metrics_stopped
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
        await server.stop()


def run(settings: ServeSettings, open_pipeline: OpenPipeline) -> None:
    """Serve on a uvloop event loop."""
    uvloop.run(serve(settings, open_pipeline))
