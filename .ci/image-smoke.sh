#!/usr/bin/env bash
# CI: build the container image with podman (no container registry needed) and smoke-run it the
# way a cluster would: read-only root filesystem, non-root, artifacts built by the image itself
# into a volume (the build Job of deploy/), then the server on that volume mounted read-only with
# a writable cache for compiled models; a gRPC health check, one Recommend and one REST call
# through the published port; then a drain on SIGTERM.
#
# The base image is made locally: debootstrap of Debian bookworm from the machine's own apt
# mirror, python3 added in a chroot, `podman import`. It is cached (with podman's storage and
# layer cache) under $RECSYS_CI_CACHE between runs on one machine; a fresh machine builds it.
# Elsewhere the same Dockerfile builds from python:3.11-slim-bookworm (its default BASE).
#   .ci/image-smoke.sh            (as root; installs podman, runc, debootstrap if absent)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CACHE=${RECSYS_CI_CACHE:-/var/cache/recsys-ci}
T0=$(date +%s)
step() { echo "== image-smoke $(($(date +%s) - T0))s: $*"; }

if ! command -v podman >/dev/null || ! command -v runc >/dev/null \
  || ! command -v debootstrap >/dev/null; then
  step "installing podman, runc, debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi

mkdir -p "$CACHE"
# This kind of machine: no CAP_SYS_RESOURCE (rlimits must stay within the hard limits), a
# hybrid cgroup layout crun refuses (runc copes), no systemd.
cat >"$CACHE/containers.conf" <<EOC
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOC
printf '[storage]\ndriver = "overlay"\ngraphroot = "%s/storage"\nrunroot = "%s/runroot"\n' \
  "$CACHE" "$CACHE" >"$CACHE/storage.conf"
export CONTAINERS_CONF="$CACHE/containers.conf" CONTAINERS_STORAGE_CONF="$CACHE/storage.conf"

# The base: its tag hashes the recipe below and the host's extra CA certificates, so a change to
# either makes a new one.
BASE_PACKAGES="python3 python3-venv python3-pip python-is-python3 ca-certificates libgomp1"
extra_cas() { cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true; }
KEY=$( (echo "bookworm minbase $BASE_PACKAGES v1"; extra_cas) | sha256sum | cut -c1-12)
BASE=localhost/recsys-base:bookworm-$KEY
if podman image exists "$BASE"; then
  step "base $BASE cached"
else
  step "base $BASE: debootstrap"
  # The Debian mirror the machine's apt sources name (deb822 or one-line form).
  MIRROR=$(grep -rhE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
    /etc/apt/sources.list.d/*.list 2>/dev/null | grep -oE 'https?://[^ ]+' \
    | grep -E '/debian/?$' | head -n 1 || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  ROOTFS=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  cleanup_rootfs() { umount "$ROOTFS/proc" 2>/dev/null || true; rm -rf "$ROOTFS"; }
  trap cleanup_rootfs EXIT
  debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >/dev/null
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$MIRROR" "$MIRROR" \
    >"$ROOTFS/etc/apt/sources.list"
  # The host's extra CA certificates, so pip inside the build trusts what the host trusts.
  mkdir -p "$ROOTFS/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/" \
    2>/dev/null || true
  step "base: python3 in a chroot"
  mount -t proc proc "$ROOTFS/proc"
  chroot "$ROOTFS" sh -c "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends $BASE_PACKAGES >/dev/null \
    && update-ca-certificates >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*"
  umount "$ROOTFS/proc"
  step "base: import"
  tar -C "$ROOTFS" -c . | podman import -q --change 'CMD ["/bin/bash"]' \
    --change 'ENV LANG=C.UTF-8' - "$BASE" >/dev/null
  cleanup_rootfs
  trap - EXIT
fi

step "build"
IMAGE=localhost/recsys:ci
# --format docker keeps HEALTHCHECK (the OCI format drops it); the layer cache lives in $CACHE.
podman build -q --pull=never --format docker --build-arg "BASE=$BASE" -t "$IMAGE" "$REPO" \
  >/dev/null
# Layers of builds older than a week: the intermediate stages (deps, build) are untagged images,
# and the layer cache needs the recent ones.
podman image prune -f --filter until=168h >/dev/null 2>&1 || true

NAME=recsys-ci-$$
ARTIFACTS=recsys-ci-artifacts-$$
CACHEVOL=recsys-ci-cache-$$
cleanup() {
  podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  podman volume rm -f "$ARTIFACTS" "$CACHEVOL" >/dev/null 2>&1 || true
}
trap cleanup EXIT
podman volume create "$ARTIFACTS" >/dev/null
podman volume create "$CACHEVOL" >/dev/null
# Same hardening as the pod: read-only root, no capabilities, no privilege escalation.
HARDENED=(--read-only --cap-drop ALL --security-opt no-new-privileges --tmpfs /tmp:rw,size=64m)

step "artifacts (the build Job's command)"
podman run --rm --no-healthcheck "${HARDENED[@]}" -v "$ARTIFACTS:/data/artifacts" "$IMAGE" \
  recsys build --out /data/artifacts --skus 3000 --users 300 --seed 5 --dim 16 >/dev/null 2>&1

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
HTTP_PORT=$(free_port)
METRICS_PORT=$(free_port)
step "run (published on the host: gRPC :$PORT, REST :$HTTP_PORT, metrics :$METRICS_PORT)"
# The image's own ports inside (the HEALTHCHECK calls 50051), published on free host ports.
podman run -d --name "$NAME" "${HARDENED[@]}" \
  -p "127.0.0.1:$PORT:50051" -p "127.0.0.1:$HTTP_PORT:8080" -p "127.0.0.1:$METRICS_PORT:9100" \
  -v "$ARTIFACTS:/data/artifacts:ro" -v "$CACHEVOL:/data/cache" \
  -e RECSYS_HTTP_PORT=8080 -e RECSYS_METRICS_HOST=0.0.0.0 "$IMAGE" \
  recsys serve --host 0.0.0.0 --workers 2 --artifacts /data/artifacts \
  --exposure-dir /tmp/exposures 2>&1 >/dev/null | grep -v 'systemd connection' || true
podman ps -q --filter "name=$NAME" | grep -q . || { echo "image-smoke: podman run failed" >&2; exit 1; }

ok=1
for _ in $(seq 1 120); do
  # The image's own HEALTHCHECK (podman has no systemd timer here to run it by itself).
  if podman healthcheck run "$NAME" >/dev/null 2>&1; then
    ok=0
    break
  fi
  podman ps -q --filter "name=$NAME" --filter status=running | grep -q . || break
  sleep 1
done
if [ $ok != 0 ]; then
  podman logs "$NAME" 2>&1 | tail -40
  echo "image-smoke: the container never became healthy" >&2
  exit 1
fi
step "healthy; one Recommend (gRPC) and one POST /v1/recommend through the host's ports"
sleep 2 # the second worker may finish loading just after the first
podman run --rm --no-healthcheck "${HARDENED[@]}" --network host "$IMAGE" \
  recsys recommend --target "127.0.0.1:$PORT" --user-id u-1 --num-results 5 >"$CACHE/reply.json"
python3 - "$CACHE/reply.json" "$HTTP_PORT" "$METRICS_PORT" <<'EOP'
import json, sys, urllib.request
n = len(json.load(open(sys.argv[1]))["items"])
assert n == 5, f"gRPC Recommend returned {n} items, expected 5"
request = urllib.request.Request(
    f"http://127.0.0.1:{sys.argv[2]}/v1/recommend", method="POST",
    data=json.dumps({"userId": "u-2", "numResults": 3}).encode(),
    headers={"Content-Type": "application/json"})
m = len(json.load(urllib.request.urlopen(request, timeout=30))["items"])
assert m == 3, f"POST /v1/recommend returned {m} items, expected 3"
page = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[3]}/metrics", timeout=30).read().decode()
assert 'recsys_requests_total{code="OK"} 2.0' in page, "the two calls are not in the metrics"
print(f"image-smoke: gRPC Recommend {n} items, REST {m} items, both counted")
EOP

step "the admission front: its configuration, checked by the image's own haproxy"
podman run --rm --no-healthcheck "${HARDENED[@]}" "$IMAGE" sh -c \
  'recsys front --backend 127.0.0.1:50061 --backend 127.0.0.1:50062 --print-config >/tmp/front.cfg && haproxy -c -f /tmp/front.cfg'

step "stop (drain on SIGTERM)"
podman stop -t 30 "$NAME" 2>&1 >/dev/null | grep -v "systemd connection" || true
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
podman logs "$NAME" 2>&1 | tail -2
[ "$code" = 0 ] || { echo "image-smoke: the server exited $code" >&2; exit 1; }
step "done"
