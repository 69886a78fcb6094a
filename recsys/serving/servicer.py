"""The Recommender gRPC service: protobuf -> recsys.types (the answer's bytes: serving/wire.py),
status codes, metrics, exposures.

This is the one place where errors become gRPC status codes:

- bytes that are not a RecommendRequest -> INVALID_ARGUMENT (``request: ...``), counted, logged
  as one WARNING line at most every ``MALFORMED_LOG_SECONDS`` (:func:`parse_request` is the
  handler's deserializer, so gRPC never sees the DecodeError);
- :class:`~recsys.serving.validation.InvalidRequest` -> INVALID_ARGUMENT, naming the field;
- no pipeline yet (still loading) -> UNAVAILABLE;
- (more than ``max_concurrent_rpcs`` calls at once never reach this module: gRPC answers them
  RESOURCE_EXHAUSTED itself, before parsing; serving/server.py)
- more than ``max_in_flight`` calls at once, or
  :class:`~recsys.serving.batching.Overloaded` (the batch
  queue is full or behind) -> RESOURCE_EXHAUSTED, at once;
- still running when the drain period ends -> UNAVAILABLE (never CANCELLED: clients retry);
- the client's deadline passed before its batch started -> DEADLINE_EXCEEDED (a deadline too
  close to rank in time is answered in retrieval order, flagged degraded, by the pipeline);
- anything else -> INTERNAL with the request id, logged once with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import grpc
from google.protobuf.message import DecodeError

from recsys.serving.batching import DeadlineExceeded, Overloaded
from recsys.serving.exposure import ExposureSink
from recsys.serving.logs import CALL
from recsys.serving.metrics import ServingMetrics
from recsys.serving.validation import InvalidRequest, new_request_id, validate_request
from recsys.serving.wire import response_bytes
from recsys.types import Recommendation, Request
from recsys.v1 import recommender_pb2

if TYPE_CHECKING:
    from recsys.serving.pipeline import RecommendPipeline

log = logging.getLogger(__name__)


RECOMMENDER_SERVICE: str = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
MALFORMED_DETAILS = "request: not a valid RecommendRequest message"
MALFORMED_LOG_SECONDS = 10.0


class MalformedRequest:
    """What :func:`parse_request` returns for bytes that do not parse as a RecommendRequest."""

    request_id: ClassVar[str] = ""


MALFORMED = MalformedRequest()


def parse_request(data: bytes) -> recommender_pb2.RecommendRequest | MalformedRequest:
    """The Recommend handler's deserializer: a parse failure becomes :data:`MALFORMED`, which
    the servicer answers with INVALID_ARGUMENT (gRPC itself would answer UNKNOWN and log a
    traceback per call)."""
    try:
        return recommender_pb2.RecommendRequest.FromString(data)
    except DecodeError:
        return MALFORMED


def add_to_server(service: RecommenderService, server: grpc.aio.Server) -> None:
    """Register ``service`` like the generated ``add_RecommenderServicer_to_server`` (same
    method path and messages, so generated stubs and reflection work) but with
    :func:`parse_request` as the request deserializer."""
    handlers = {
        "Recommend": grpc.unary_unary_rpc_method_handler(
            service.Recommend,
            request_deserializer=parse_request,
            response_serializer=_as_is,  # Recommend answers serialized bytes (response_bytes)
        )
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(RECOMMENDER_SERVICE, handlers),)
    )
    registered: Any = server  # grpc-stubs predates add_registered_method_handlers
    registered.add_registered_method_handlers(RECOMMENDER_SERVICE, handlers)


def _as_is(data: bytes) -> bytes:
    return data


def local_hour() -> int:
    return time.localtime().tm_hour


class _Failure(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class RecommenderService:
    """Serves Recommend once :meth:`attach` has handed it an open pipeline."""

    def __init__(
        self,
        metrics: ServingMetrics,
        exposures: ExposureSink,
        *,
        hour: Callable[[], int] = local_hour,
        make_request_id: Callable[[], str] = new_request_id,
        max_in_flight: int = 0,
    ) -> None:
        if max_in_flight < 0:
            raise ValueError(f"max_in_flight is {max_in_flight}; expected >= 0 (0: no bound)")
        self._max_in_flight = max_in_flight
        self._metrics = metrics
        self._exposures = exposures
        self._hour = hour
        self._make_request_id = make_request_id
        self._pipeline: RecommendPipeline | None = None
        self._draining = False
        self._abandoning = False
        self._calls: set[asyncio.Task[Any]] = set()
        self._in_flight = 0
        self._malformed_logged_at = -MALFORMED_LOG_SECONDS
        self._malformed_unlogged = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_call_at = time.monotonic()

    def attach(self, pipeline: RecommendPipeline) -> None:
        self._pipeline = pipeline
        self._metrics.observe_versions(pipeline.versions())

    @property
    def attached(self) -> bool:
        """Whether a pipeline is serving (so there is traffic to keep serving while stopping)."""
        return self._pipeline is not None

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def control_from_last_good(self) -> list[str]:
        """The control documents the pipeline serves from its last good local copies, sorted
        (none before a pipeline is attached)."""
        return sorted(self._pipeline.control_from_last_good()) if self._pipeline else []

    def start_draining(self) -> None:
        """From now on, new calls get UNAVAILABLE; calls already running finish normally."""
        self._draining = True
        self._last_call_at = time.monotonic()  # :meth:`wait_quiet` counts from here at least

    def abandon_in_flight(self) -> None:
        """Stop the calls still running (the drain period is over): each answers UNAVAILABLE,
        so its client retries elsewhere, rather than seeing CANCELLED."""
        self._abandoning = True
        for task in self._calls:
            task.cancel()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def wait_idle(self) -> None:
        """Return once no Recommend call is in progress."""
        await self._idle.wait()

    async def wait_quiet(self, quiet_seconds: float) -> None:
        """Return once no call is in progress and none has arrived for ``quiet_seconds`` (nor
        since :meth:`start_draining`).

        gRPC queues calls that arrived before a handler could pick them up (it asks for one call
        at a time, from the event loop) and stopping the server drops that queue: its clients
        see CANCELLED. So the drain lets the loop run until calls stop coming, each answered by
        a handler (UNAVAILABLE once draining), before the server stops.
        """
        while True:
            await self._idle.wait()
            quiet_for = time.monotonic() - self._last_call_at
            if quiet_for >= quiet_seconds and self._in_flight == 0:
                return
            await asyncio.sleep(max(quiet_seconds - quiet_for, 0.01))

    async def Recommend(
        self,
        request: recommender_pb2.RecommendRequest | MalformedRequest,
        context: grpc.aio.ServicerContext[
            recommender_pb2.RecommendRequest, recommender_pb2.RecommendResponse
        ],
    ) -> bytes:
        code, details, response = await self.serve(request, context.time_remaining())
        if response is None:
            await context.abort(code, details)
        return response

    async def serve(
        self,
        request: recommender_pb2.RecommendRequest | MalformedRequest,
        time_remaining: float | None,
    ) -> tuple[grpc.StatusCode, str, bytes | None]:
        """One Recommend call, whatever the transport (gRPC here, HTTP/JSON in serving/rest.py):
        validated, admitted, served, counted and recorded the same way. Returns the status code,
        its details and the serialized RecommendResponse (None unless OK)."""
        started = time.perf_counter()
        task = asyncio.current_task()
        if task is not None:
            self._calls.add(task)
        self._in_flight += 1
        self._last_call_at = time.monotonic()
        self._idle.clear()
        self._metrics.request_started()
        code = grpc.StatusCode.OK
        details = ""
        response: bytes | None = None
        try:
            response = await self._recommend(request, time_remaining)
        except _Failure as failure:
            code, details = failure.code, failure.details
        except asyncio.CancelledError:
            if self._abandoning and task is not None and task.uncancel() == 0:
                code = grpc.StatusCode.UNAVAILABLE
                details = "the server shut down before this call finished; retry"
            else:
                code = grpc.StatusCode.CANCELLED
                raise
        except Exception:  # a bug outside the pipeline call: still one clean INTERNAL
            log.exception("Recommend failed, request_id=%s", request.request_id or "(none)")
            code = grpc.StatusCode.INTERNAL
            details = f"internal error, request_id={request.request_id or '(none)'}"
        finally:
            # Counted before the status leaves: a client that saw it can rely on the metric.
            self._calls.discard(task)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            self._metrics.request_finished(code.name, time.perf_counter() - started)
        return code, details, response

    async def _recommend(
        self,
        message: recommender_pb2.RecommendRequest | MalformedRequest,
        time_remaining: float | None,
    ) -> bytes:
        deadline = None if time_remaining is None else time.perf_counter() + time_remaining
        if isinstance(message, MalformedRequest):
            self._log_malformed()
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED_DETAILS)
        try:
            request = validate_request(
                message, hour=self._hour(), make_request_id=self._make_request_id
            )
        except InvalidRequest as e:
            raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        pipeline = self._pipeline
        if self._draining:
            raise _Failure(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry")
        if pipeline is None:
            raise _Failure(
                grpc.StatusCode.UNAVAILABLE, "the recommender is still loading; retry shortly"
            )
        CALL.set((request.request_id, pipeline.versions()))  # for log lines of this call
        if 0 < self._max_in_flight < self._in_flight:
            raise _Failure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server overloaded, request_id={request.request_id}: more than "
                f"{self._max_in_flight} calls in flight",
            )
        try:
            recommendation = await pipeline.recommend(request, deadline)
            response = response_bytes(recommendation)
            self._record(pipeline, request, recommendation)
        except DeadlineExceeded as e:
            raise _Failure(grpc.StatusCode.DEADLINE_EXCEEDED, str(e)) from None
        except Overloaded as e:
            raise _Failure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server overloaded, request_id={request.request_id}: {e}",
            ) from None
        except Exception:
            log.exception("Recommend failed, request_id=%s", request.request_id)
            raise _Failure(
                grpc.StatusCode.INTERNAL, f"internal error, request_id={request.request_id}"
            ) from None
        return response

    def _log_malformed(self) -> None:
        """One WARNING line (no traceback) at most every MALFORMED_LOG_SECONDS, with a count."""
        self._malformed_unlogged += 1
        now = time.monotonic()
        if now - self._malformed_logged_at < MALFORMED_LOG_SECONDS:
            return
        log.warning(
            "Recommend: %d request(s) that are not a valid RecommendRequest message in the "
            "last %.0fs (INVALID_ARGUMENT; a client sending the wrong bytes?)",
            self._malformed_unlogged,
            MALFORMED_LOG_SECONDS,
        )
        self._malformed_logged_at = now
        self._malformed_unlogged = 0

    def _record(
        self, pipeline: RecommendPipeline, request: Request, recommendation: Recommendation
    ) -> None:
        self._metrics.observe_versions(pipeline.versions())
        self._metrics.observe_recommendation(recommendation)
        self._exposures.record(request, recommendation)
