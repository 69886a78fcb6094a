# recsys serving image: build stage installs the project into a venv, runtime stage runs it
# as a non-root user. Artifacts live on a volume at /data/artifacts (built on first start if
# absent); a fleet mounts a shared, pre-built artifact root there instead.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY recsys/ recsys/
RUN pip install --no-cache-dir .

FROM python:3.11-slim-bookworm AS runtime
# libgomp1: the OpenMP runtime LightGBM and FAISS link against. Debian's security updates move
# its version, so it is left unpinned on purpose.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 recsys \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin recsys \
 && mkdir -p /data/artifacts /data/exposures \
 && chown recsys:recsys /data/artifacts /data/exposures && chmod 0700 /data/exposures
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RECSYS_ARTIFACTS=/data/artifacts
USER 10001:10001
WORKDIR /home/recsys
VOLUME ["/data/artifacts", "/data/exposures"]
EXPOSE 50051 9100
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 \
  CMD ["recsys", "health", "--target", "127.0.0.1:50051"]
CMD ["sh", "-c", "recsys build --out /data/artifacts --if-missing && exec recsys serve --host 0.0.0.0 --artifacts /data/artifacts"]
