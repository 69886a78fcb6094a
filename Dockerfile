# recsys serving image: the deps and build stages make a venv with the project in it, the runtime
# stage runs it as a non-root user on a read-only root filesystem. Artifacts live on a volume at
# /data/artifacts (mounted read-only in a fleet, filled by the build Job of deploy/); compiled
# models go to the pod's own writable cache at /data/cache; exposure files (when the sink is not
# a Redis Stream) to /data/exposures.
#
# BASE: python:3.11-slim-bookworm anywhere a registry is reachable; CI passes a Debian bookworm
# base it made itself with debootstrap (.ci/image-smoke.sh). Both run the same steps below.
ARG BASE=python:3.11-slim-bookworm

# The pinned dependencies and the build backend, read from pyproject.toml in a stage of their
# own, then installed in another: only a change to that list reinstalls them (not a code change,
# nor one to pyproject's tool settings), and the runtime image's copy of them stays cached.
FROM ${BASE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(p['project']['dependencies'] + p['build-system']['requires']))" \
      > /requirements.txt

FROM ${BASE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt

# The project itself, as a wheel (built without fetching anything).
FROM deps AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY recsys/ recsys/
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

FROM ${BASE} AS runtime
# libgomp1: the OpenMP runtime LightGBM and FAISS link against; haproxy: the admission front
# (`recsys front`, the pods' gRPC port). Debian's security updates move their versions, so they
# are left unpinned on purpose.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 haproxy \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 recsys \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin recsys \
 && mkdir -p /data/artifacts /data/exposures /data/cache \
 && chown recsys:recsys /data/artifacts /data/exposures /data/cache \
 && chmod 0700 /data/exposures /data/cache
COPY --from=deps /opt/venv /opt/venv
COPY --from=build /wheels /tmp/wheels
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RECSYS_ARTIFACTS=/data/artifacts \
    RECSYS_COMPILED_CACHE=/data/cache/recsys/compiled \
    RECSYS_EXPOSURE_DIR=/data/exposures
USER 10001:10001
WORKDIR /home/recsys
VOLUME ["/data/artifacts", "/data/exposures", "/data/cache"]
EXPOSE 50051 8080 9100
# The timeout allows for the CLI's start on a busy node (about 3 s at a load of 7 on 2 cores).
HEALTHCHECK --interval=15s --timeout=10s --start-period=180s --retries=3 \
  CMD ["recsys", "health", "--target", "127.0.0.1:50051"]
CMD ["sh", "-c", "recsys build --out /data/artifacts --if-missing && exec recsys serve --host 0.0.0.0 --artifacts /data/artifacts"]
