"""The fleet's shape on this machine, from the manifests' own settings.

Redis with the ACL users of deploy/redis-acl.conf on a free port, two serving "pods" (each the
two containers' commands and environments of deploy/recsys.yaml: ``recsys serve --workers 2``
with a port per worker, the control plane and exposure stream in Redis as ACL user
recsys-server, compiled models in the pod's own cache, JSON logs; and ``recsys front`` on the
pod's gRPC port in front of the two workers), the exposure and outcome archivers of
deploy/archiver.yaml (as recsys-ops) and two replicas of the retraining controller of
deploy/controller.yaml (as recsys-controller; one holds the lease), all as processes. Service
names become 127.0.0.1 and the Redis port, pod paths become directories under the test's own,
the shared volumes (the artifact root, the archive) are one directory each. A model version
trained into the registry and promoted through the control plane (the ops commands, as
recsys-ops) reaches both pods, over gRPC and HTTP/JSON, and their exposure records reach the
archive; then a canary started by the ops command is judged by the controller on simulated
traffic (outcome events appended to the outcome stream as recsys-outcomes, archived) and
promoted, and reaches both pods.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.control.redis_helpers import free_port
from tests.serving.metrics_page import fetch_metrics, post_json
from tests.serving.test_front import two_free_ports

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SERVICES = ("recsys-redis:6379", "recsys-exposures:6379")
SHARED_VOLUMES = ("/data/artifacts", "/data/archive")
POD_PATHS = ("/data/", "/etc/recsys/")
START_SECONDS = 240.0


def manifests() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted(p for p in DEPLOY.glob("*.yaml") if not p.name.startswith(".")):
        documents.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return documents


def container(kind: str, name: str, container_name: str = "") -> dict[str, Any]:
    """A container (default: the first) of the pod template of ``kind``/``name`` in deploy/."""
    (found,) = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    containers: list[dict[str, Any]] = found["spec"]["template"]["spec"]["containers"]
    if not container_name:
        return containers[0]
    (spec,) = [c for c in containers if c["name"] == container_name]
    return spec


@dataclass
class Pod:
    """A pod's filesystem on this machine: its own directory, the shared volumes (the
    artifact root, and the archive under the test's directory)."""

    root: Path
    artifacts: Path
    redis_port: int

    def local(self, value: str) -> str:
        """A manifest value (an argument or an environment value) as this machine sees it."""
        for service in SERVICES:
            value = value.replace(service, f"127.0.0.1:{self.redis_port}")
        if value == "0.0.0.0":
            return "127.0.0.1"
        artifacts, archive = SHARED_VOLUMES
        if value.startswith(artifacts):
            return str(self.artifacts) + value.removeprefix(artifacts)
        if value.startswith(archive):
            return str(self.root.parent / "archive") + value.removeprefix(archive)
        if value.startswith(POD_PATHS):
            return str(self.root / value.lstrip("/"))
        return value

    def command(self, spec: dict[str, Any], **env: str) -> tuple[list[str], dict[str, str]]:
        """The container's command and environment here (``env`` overrides, e.g. ports)."""
        args = [self.local(a) for a in spec["args"]]
        variables = {e["name"]: self.local(e["value"]) for e in spec.get("env", [])}
        argv = [sys.executable, "-m", "recsys.cli.main", *args[1:]]  # args[0] is `recsys`
        return argv, {**os.environ, **variables, **env}

    def mount_password(
        self,
        spec: dict[str, Any],
        passwords: dict[str, str],
        volumes: list[dict[str, Any]] | None = None,
    ) -> None:
        """The Secret item the pod mounts as its Redis password file."""
        found = volumes if volumes is not None else spec_volumes(spec)
        (volume,) = [v for v in found if v["name"] == "redis-password"]
        (item,) = volume["secret"]["items"]
        mount = next(m for m in spec["volumeMounts"] if m["name"] == "redis-password")
        path = Path(self.local(f"{mount['mountPath']}/{item['path']}"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(passwords[item["key"]])
        path.chmod(0o440)


def spec_volumes(spec: dict[str, Any]) -> list[dict[str, Any]]:
    for document in manifests():
        template = document.get("spec", {}).get("template", {}).get("spec", {})
        if spec in template.get("containers", []):
            volumes: list[dict[str, Any]] = template["volumes"]
            return volumes
    raise AssertionError("container not found in deploy/")


def acl_file(directory: Path, passwords: dict[str, str]) -> Path:
    """deploy/redis-acl.conf with each user's placeholder hash replaced by its password's."""
    lines = []
    for line in (DEPLOY / "redis-acl.conf").read_text().splitlines():
        user = re.match(r"user (\S+) ", line)
        if user and user.group(1) in passwords:
            digest = hashlib.sha256(passwords[user.group(1)].encode()).hexdigest()
            line = re.sub(r"#[0-9a-f]{64}", f"#{digest}", line)
        lines.append(line)
    path = directory / "users.acl"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Everything a test starts, stopped (SIGTERM, then SIGKILL) at the end."""
    started: list[Process] = []
    yield started
    for process in reversed(started):
        if process.popen.poll() is None:
            process.popen.send_signal(signal.SIGTERM)
    for process in reversed(started):
        try:
            process.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait()


def start(
    processes: list[Process], name: str, argv: list[str], env: dict[str, str], logs: Path
) -> Process:
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    process = Process(name, popen, log)
    processes.append(process)
    return process


def wait_for(what: str, check: Any, processes: list[Process], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (OSError, grpc.RpcError, redis.RedisError):
            result = None
        if result:
            return result
        for process in processes:
            if process.popen.poll() is not None:
                pytest.fail(f"{process.name} exited:\n{process.log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def served_version(port: int, user: str) -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        reply = stub.Recommend(recommender_pb2.RecommendRequest(user_id=user), timeout=30)
    return str(reply.model_version)


def ops(argv: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "recsys.cli.main", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


TEST_POLICY = """
format = 1
revision = 1
[canary]
ramp = [5, 50, 100]
min_requests_per_step = 20
margin = 0.5
max_p99_ms = 60000.0
"""
"""Short canary steps and a wide margin, so a canary as good as production is promoted within
a few hundred simulated requests; no latency guardrail to speak of (a loaded test machine's p99
is noise)."""

USERS = ("recsys-server", "recsys-ops", "recsys-controller", "recsys-outcomes")


def controller_metric(port: int, sample: str) -> float:
    for line in fetch_metrics(port, timeout=10).splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return -1.0


@pytest.mark.slow
def test_the_fleet_promotes_by_hand_and_by_its_controller_to_both_pods(
    artifacts: Path, tmp_path: Path, processes: list[Process]
) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (the pods' front; .ci/run installs it)")
    logs = tmp_path / "logs"
    logs.mkdir()
    passwords = {name: secrets.token_hex(16) for name in USERS}
    redis_port = free_port()
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    start(
        processes,
        "redis",
        [
            "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(redis_dir),
            "--aclfile", str(acl_file(redis_dir, passwords)),
        ],
        dict(os.environ),
        logs,
    )  # fmt: skip
    anonymous = redis.Redis(port=redis_port)
    wait_for("redis", anonymous.ping, processes, 30)
    with pytest.raises(redis.exceptions.NoPermissionError):  # `default` may only PING
        anonymous.get("recsys:anything")
    anonymous.close()

    # The seed Job publishes the control documents as recsys-ops (the pods may only read them).
    seed_spec = container("Job", "recsys-seed")
    seed = Pod(tmp_path / "seed", artifacts, redis_port)
    seed.mount_password(seed_spec, passwords)
    argv, env = seed.command(seed_spec)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    serving = container("Deployment", "recsys", "recsys")
    front = container("Deployment", "recsys", "front")
    pods = []
    for n in range(2):
        pod = Pod(tmp_path / f"pod-{n}", artifacts, redis_port)
        pod.mount_password(serving, passwords)
        names = ("grpc", "http", "health", "metrics", "front-metrics")
        ports = {name: free_port() for name in names}
        workers = two_free_ports()  # the manifest's stride: worker n on RECSYS_PORT + n
        argv, env = pod.command(
            serving,
            RECSYS_PORT=str(workers),
            RECSYS_HTTP_PORT=str(ports["http"]),
            RECSYS_HEALTH_PORT=str(ports["health"]),
            RECSYS_METRICS_PORT=str(ports["metrics"]),
        )
        start(processes, f"pod-{n}", argv, env, logs)
        # The pod's gRPC port is the front's, with the workers behind it.
        argv, env = pod.command(
            front,
            RECSYS_FRONT_LISTEN=f"127.0.0.1:{ports['grpc']}",
            RECSYS_FRONT_BACKENDS=f"127.0.0.1:{workers},127.0.0.1:{workers + 1}",
            RECSYS_FRONT_METRICS=f"127.0.0.1:{ports['front-metrics']}",
        )
        start(processes, f"front-{n}", argv, env, logs)
        pods.append((pod, ports))
    # Both archivers of the archiver pod: the exposure stream and the outcome stream.
    archiver_pod = Pod(tmp_path / "archiver", artifacts, redis_port)
    for name in ("archiver", "outcomes"):
        spec = container("Deployment", "recsys-archiver", name)
        archiver_pod.mount_password(spec, passwords)
        argv, env = archiver_pod.command(spec)
        start(processes, f"archiver-{name}", argv, env, logs)
    # Two controller replicas (the Deployment has one; a second shows the lease): the manifest's
    # command with a shorter look and join window for simulated minutes, and the test's policy.
    controller_spec = container("Deployment", "recsys-controller")
    policy = tmp_path / "policy.toml"
    policy.write_text(TEST_POLICY)
    controllers = []
    for n in range(2):
        pod = Pod(tmp_path / f"controller-{n}", artifacts, redis_port)
        pod.mount_password(controller_spec, passwords)
        port = free_port()
        argv, env = pod.command(controller_spec, RECSYS_METRICS_PORT=str(port))
        argv += ["--look-seconds", "1", "--late-seconds", "10", "--policy", str(policy)]
        start(processes, f"controller-{n}", argv, env, logs)
        controllers.append(port)

    for _pod, ports in pods:  # both workers of both pods up and connected to the control plane

        def ready(metrics_port: int = ports["metrics"]) -> bool:
            page = fetch_metrics(metrics_port, timeout=10)
            return (
                "recsys_workers 2.0" in page
                and re.search(r'recsys_control_plane_connected\{document="routing"\} 1\.0', page)
                is not None
            )

        wait_for("a pod's two workers", ready, processes, START_SECONDS)
    # The kubelet's probes go to the health port the manifest gives the server.
    probed = {serving[probe]["grpc"]["port"] for probe in ("startupProbe", "readinessProbe")}
    probed.add(serving["livenessProbe"]["grpc"]["port"])
    variables = {e["name"]: e["value"] for e in serving["env"]}
    assert probed == {int(variables["RECSYS_HEALTH_PORT"])}
    for _pod, ports in pods:
        with grpc.insecure_channel(f"127.0.0.1:{ports['health']}") as channel:
            probe = health_pb2.HealthCheckRequest(service="recsys.v1.Recommender")
            status = health_pb2_grpc.HealthStub(channel).Check(probe, timeout=30).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    before = {served_version(ports["grpc"], "user-0000001") for _pod, ports in pods}
    assert len(before) == 1

    # One controller replica holds the lease and looks; the other stands by.
    def lease_holders() -> list[float]:
        return sorted(controller_metric(p, "recsys_controller_lease_held") for p in controllers)

    wait_for("the lease", lambda: lease_holders() == [0.0, 1.0], processes, START_SECONDS)
    (acting,) = [p for p in controllers if controller_metric(p, "recsys_controller_lease_held")]
    wait_for(
        "a controller's look",
        lambda: controller_metric(acting, "recsys_controller_looks_total") >= 1,
        processes,
        START_SECONDS,
    )

    # The training Job of deploy/artifacts.yaml (as recsys-ops), then a promotion from the same
    # environment, as an operator runs it.
    cronjob = next(d for d in manifests() if d["metadata"]["name"] == "recsys-train")
    (train_spec,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    train_volumes = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    job = Pod(tmp_path / "train", artifacts, redis_port)
    job.mount_password(train_spec, passwords, train_volumes)
    argv, ops_env = job.command(train_spec)

    def train(seed: int) -> str:  # another seed than the build's (11): another version
        trained = subprocess.run(
            [*argv, "--seed", str(seed)], env=ops_env, capture_output=True, text=True, timeout=600
        )
        assert trained.returncode == 0, trained.stdout + trained.stderr
        return trained.stdout.split()[-1]

    version = train(12)
    assert version not in before
    ops(["models", "promote", "ranker", version, "--artifacts", str(artifacts), "--force"], ops_env)

    def reaches_both_pods(version: str) -> None:
        for _pod, ports in pods:
            wait_for(
                "the promoted version on a pod",
                lambda port=ports["grpc"]: served_version(port, "user-0000002") == version,
                processes,
                START_SECONDS,
            )
            status, body = post_json(ports["http"], {"userId": "user-0000003"})
            assert status == 200
            assert body["modelVersion"] == version

    reaches_both_pods(version)
    # Each pod's front counted the calls it forwarded (HAProxy's exporter) and refused none.
    for _pod, ports in pods:
        page = fetch_metrics(ports["front-metrics"], timeout=10)
        forwarded = re.search(
            r'^haproxy_frontend_http_requests_total\{proxy="grpc"\} (\d+)', page, re.M
        )
        assert forwarded is not None, page
        assert int(forwarded.group(1)) >= 1
        assert 'haproxy_frontend_http_responses_total{proxy="grpc",code="5xx"} 0\n' in page
    # Each pod compiled the version into its own cache, not into the shared volume.
    for pod, _ports in pods:
        compiled = pod.root / "data" / "cache" / "recsys" / "compiled" / "ranker" / version
        assert any(compiled.glob("*.bin")), f"nothing compiled in {compiled}"

    # The exposure records went to the stream, and the archiver moved them into files.
    archive = tmp_path / "archive"

    def archived(kind: str, text: bytes) -> bool:
        files = [f for f in (archive / kind).rglob("*") if f.is_file()]
        texts = (
            gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes() for f in files
        )
        return any(text in t for t in texts)

    wait_for("the archiver", lambda: archived("exposures", version.encode()), processes, 60)

    # A canary started by the ops command (gates, no analysis), traffic on one pod with the
    # outcome events appended to the outcome stream as recsys-outcomes: the controller judges it
    # from the archive, ramps it and promotes it, and both pods serve it.
    challenger = train(13)
    ops(
        [
            "models", "canary", "ranker", challenger, "--percent", "5",
            "--artifacts", str(artifacts), "--policy", str(policy),
        ],
        ops_env,
    )  # fmt: skip
    mobile = tmp_path / "mobile-backend"
    mobile.mkdir()
    (mobile / "password").write_text(passwords["recsys-outcomes"])
    simulation = start(
        processes,
        "simulate",
        [
            sys.executable, "-m", "recsys.cli.main", "simulate",
            "--target", f"127.0.0.1:{pods[0][1]['grpc']}", "--artifacts", str(artifacts),
            "--outcome-sink", f"redis://recsys-outcomes@127.0.0.1:{redis_port}/0",
            "--redis-password-file", str(mobile / "password"),
            "--minutes", "600", "--speed", "120", "--rate", "20", "--users", "800",
            "--concurrency", "8", "--start-hour", "11.5", "--timeout", "30",
        ],
        {**os.environ, "RECSYS_CONTROL": ""},
        logs,
    )  # fmt: skip
    decisions = "recsys_controller_decisions_total"
    wait_for(
        "the controller's promotion",
        lambda: controller_metric(acting, f'{decisions}{{action="promote"}}') >= 1,
        [p for p in processes if p is not simulation],
        START_SECONDS,
    )
    simulation.popen.send_signal(signal.SIGTERM)
    assert archived("outcomes", b'"request_id"')
    assert controller_metric(acting, f'{decisions}{{action="ramp"}}') >= 1
    assert controller_metric(acting, f'{decisions}{{action="rollback"}}') == 0
    reaches_both_pods(challenger)
    records = [
        json.loads(line)
        for line in (artifacts / "models" / "ranker" / "decisions.jsonl").read_text().splitlines()
    ]
    promotion = records[-1]
    assert promotion["decision"] == "canary-promote"
    assert promotion["author"] == "recsys controller"
    assert promotion["state"]["version"] == challenger
    assert promotion["evidence"]["canary_requests"] > 0
    standby = next(p for p in controllers if p != acting)
    assert controller_metric(standby, "recsys_controller_looks_total") == 0
