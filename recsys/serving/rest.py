"""Recommend over HTTP/JSON beside gRPC: ``POST /v1/recommend`` on ``--http-port``, and
``GET /healthz``.

The body is a RecommendRequest in the proto's canonical JSON mapping (protobuf's json_format:
``userId`` or ``user_id``, int64 as a string or a number), and so is the answer (lowerCamelCase
names, int64 as strings). The call goes through the same
:meth:`~recsys.serving.servicer.RecommenderService.serve` as gRPC: the same validation and
messages, admission, drain, metrics (``recsys_requests_total`` by gRPC code) and exposure
record. A failure answers ``{"code": "<gRPC code>", "message": "<details>"}`` with the HTTP
status of :data:`HTTP_STATUS`. A deadline may be given in milliseconds with the
``X-Recsys-Timeout-Ms`` header (gRPC clients send theirs with the call).

aiohttp serves it on the server's own event loop (uvloop): the request is parsed and the answer
encoded on the loop, as gRPC does with protobuf; the work runs in the pipeline's batcher.
"""

from __future__ import annotations

import json
import logging
import socket

import grpc
import orjson
from aiohttp import web
from google.protobuf import json_format

from recsys.serving.servicer import MALFORMED, RecommenderService
from recsys.v1 import recommender_pb2

log = logging.getLogger(__name__)

RECOMMEND_PATH = "/v1/recommend"
HEALTH_PATH = "/healthz"
TIMEOUT_HEADER = "X-Recsys-Timeout-Ms"
MAX_BODY_BYTES = 64 * 1024
"""A RecommendRequest is a few hundred bytes; a bigger body is refused (413) unread."""

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
}
"""gRPC status code -> HTTP status; any code not named here is 500."""


def error(code: grpc.StatusCode, message: str) -> web.Response:
    return web.Response(
        body=orjson.dumps({"code": code.name, "message": message}),
        status=HTTP_STATUS.get(code, 500),
        content_type="application/json",
    )


def parse_body(body: bytes) -> recommender_pb2.RecommendRequest:
    """The body as a RecommendRequest; raises ValueError with a one-line reason."""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"request: not JSON ({e})") from None
    if not isinstance(document, dict):
        raise ValueError("request: expected a JSON object (a RecommendRequest)")
    try:
        return json_format.ParseDict(document, recommender_pb2.RecommendRequest())
    except json_format.ParseError as e:
        raise ValueError("request: " + " ".join(str(e).split())) from None  # one line


def parse_timeout(raw: str | None) -> float | None:
    """Seconds remaining from the timeout header (milliseconds); None when absent."""
    if raw is None:
        return None
    try:
        millis = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_HEADER}: {raw!r}; expected milliseconds") from None
    if not millis > 0:
        raise ValueError(f"{TIMEOUT_HEADER}: {raw!r}; expected > 0 milliseconds")
    return millis / 1000


class RestServer:
    """The HTTP/JSON endpoint of one server process."""

    def __init__(self, service: RecommenderService) -> None:
        self._service = service
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(RECOMMEND_PATH, self._recommend)
        app.router.add_get(HEALTH_PATH, self._health)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        self._site: web.SockSite | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen on ``host:port`` (0: any free port); returns the bound port. ``reuse_port``:
        share the port with sibling workers (SO_REUSEPORT). Raises OSError if it cannot bind."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        try:
            await self._runner.setup()
            self._site = web.SockSite(self._runner, sock)
            await self._site.start()
        except BaseException:
            sock.close()
            raise
        bound: int = sock.getsockname()[1]
        return bound

    async def stop(self) -> None:
        """Stop listening and close the connections (after the servicer has drained)."""
        await self._runner.cleanup()

    async def _health(self, _request: web.Request) -> web.Response:
        """``{"status": "SERVING" | "NOT_SERVING", "control_from_last_good": [documents]}``:
        200 when serving, else 503; the list names the control documents served from the
        server's last good local copies (empty once the store gave a version of each)."""
        serving = self._service.attached and not self._service.draining
        return web.json_response(
            {
                "status": "SERVING" if serving else "NOT_SERVING",
                "control_from_last_good": self._service.control_from_last_good,
            },
            status=200 if serving else 503,
        )

    async def _recommend(self, request: web.Request) -> web.Response:
        try:
            time_remaining = parse_timeout(request.headers.get(TIMEOUT_HEADER))
            message = parse_body(await request.read())
        except ValueError as e:
            # Counted and logged as gRPC counts a message that does not decode; the answer
            # names what is wrong with this body.
            code, _details, _none = await self._service.serve(MALFORMED, None)
            return error(code, str(e))
        code, details, response = await self._service.serve(message, time_remaining)
        if response is None:
            return error(code, details)
        return web.Response(
            body=orjson.dumps(
                json_format.MessageToDict(recommender_pb2.RecommendResponse.FromString(response))
            ),
            content_type="application/json",
        )
