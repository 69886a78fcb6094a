#!/usr/bin/env bash
# CI's short load check: a small world, a real `recsys serve --workers 2`, a headless locust run
# with the realistic mix; fails if any call fails, or if the server does not drain on SIGTERM.
#   loadtest/ci_smoke.sh [BIN] [ARTIFACTS]
set -euo pipefail
BIN=${1:-.venv/bin}
ART=${2:-$(mktemp -d /tmp/recsys-ci-loadtest.XXXXXX)}  # fresh: artifacts of older code may differ
PORT=${RECSYS_CI_PORT:-50151}
METRICS=${RECSYS_CI_METRICS_PORT:-9151}

if [ ! -d "$ART/world" ]; then
  "$BIN/recsys" build --out "$ART" --skus 20000 --users 3000 --seed 5 --dim 16 >/dev/null
fi
"$BIN/recsys" serve --artifacts "$ART" --port "$PORT" --metrics-port "$METRICS" --workers 2 \
  >"$ART/serve.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  "$BIN/recsys" health --target "127.0.0.1:$PORT" --service recsys.v1.Recommender >/dev/null 2>&1 \
    && break
  sleep 0.5
done
sleep 3  # the second worker may finish loading just after the first
RECSYS_ARTIFACTS="$ART" "$BIN/locust" -f loadtest/locustfile.py --headless \
  --host "127.0.0.1:$PORT" -u 20 -r 20 -t 15s --only-summary
"$BIN/python" -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())' \
  "http://127.0.0.1:$METRICS/metrics" | grep -E '^recsys_(workers|requests_total|result_cache_lookups_total)'
kill -TERM "$server"
wait "$server"
trap - EXIT
echo "loadtest: server drained and exited 0"
