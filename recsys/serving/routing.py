"""Calls routed by user: the calls of one user go to one server process while it has room.

Each server process keeps its own result cache (serving/cache.py), and a feed refresh is a hit
only in the process that served the user's last feed. Calls spread over processes without
regard to the user (the kernel's SO_REUSEPORT, least-connections balancing, a round-robin
client) find the user's last feed in the process they reach only by chance: the more processes,
the fewer hits. Across a fleet of thousands of pods that chance is close to nil (2% over 11,600
processes: benchmarks/bench_routing.py, benchmarks/README.md "Thirteenth round").

So a client names the user of each call twice: in the request (``user_id``, what the answer
depends on) and in the call's metadata under :data:`USER_HEADER` (what the balancers route on;
a header, since a proxy cannot read the protobuf body). Two balancers read it:

- between pods, the client's own gRPC channel over the pods' addresses (a headless Service),
  with gRPC's ``ring_hash`` policy hashing that header (:func:`routed_channel_options`);
- within a pod, the admission front (serving/front.py), hashing the same header onto the
  pod's workers while the user's worker has a free slot, and to the least loaded one when not.

Between pods the hash is consistent: when a pod comes or goes, only the users it held move. The
header changes nothing else: a call without it, or with another user's id, gets the same
answer, routed by load instead of by user.
"""

from __future__ import annotations

import json
import os
from urllib.parse import quote

USER_HEADER = "recsys-user-id"
"""The gRPC metadata key that carries the call's user id for routing (lower case, as HTTP/2
header names are)."""

RING_HASH_HEADER_SWITCH = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"
"""gRPC core reads ``ring_hash``'s ``requestHashHeader`` (gRFC A76) only with this variable
set to ``true`` (grpcio 1.85); without it every call fails with "hash attribute not present"."""


def user_header_value(user_id: str) -> str:
    """The header's value for ``user_id``: its UTF-8 percent-encoded, every byte but RFC 3986's
    unreserved characters (``A-Z a-z 0-9 - . _ ~``) as ``%XX``. A user id may hold any
    character, a gRPC header value only printable ASCII (gRPC refuses the call otherwise); the
    balancers only hash the value, and ids of unreserved characters are sent as they are."""
    return quote(user_id, safe="")


def user_metadata(user_id: str) -> tuple[tuple[str, str], ...]:
    """The metadata to send with a call for ``user_id``."""
    return ((USER_HEADER, user_header_value(user_id)),)


def routed_channel_options() -> list[tuple[str, str]]:
    """Channel options that send every call of one user to the same address of the target
    (``dns:///recsys.recsys.svc.cluster.local:50051``, the headless Service; or
    ``ipv4:A:P,B:P``), by gRPC's ``ring_hash`` policy over :data:`USER_HEADER`. Turns on gRPC's
    switch for the header hash (:data:`RING_HASH_HEADER_SWITCH`) in this process unless it is
    set already."""
    os.environ.setdefault(RING_HASH_HEADER_SWITCH, "true")
    config = {
        "loadBalancingConfig": [{"ring_hash_experimental": {"requestHashHeader": USER_HEADER}}]
    }
    return [("grpc.service_config", json.dumps(config))]
