# The verbs people type. `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
ARTIFACTS ?= artifacts
BIN := $(VENV)/bin
PROTO_OUT := recsys/v1

.PHONY: run build serve test lint proto bench bench-throughput bench-rank-cut loadtest loadtest-ci \
	deploy-check alerts-check clean install install-dev image-smoke policy-check \
	deploy-monitoring

run: build serve ## build the demo world if absent, then serve gRPC on 127.0.0.1:50051

build: $(BIN)/.runtime
	$(BIN)/recsys build --out $(ARTIFACTS) --if-missing

serve: $(BIN)/.runtime
	$(BIN)/recsys serve --artifacts $(ARTIFACTS)

test: $(BIN)/.dev ## install what the tests need and run them
	$(BIN)/pytest

lint: $(BIN)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile

proto: $(BIN)/.dev ## regenerate the Python code from protos/
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
	  protos/recsys/v1/recommender.proto

bench: $(BIN)/.dev build
	$(BIN)/python -m benchmarks.bench_latency --artifacts $(ARTIFACTS)

bench-throughput: $(BIN)/.dev build ## echo vs naive vs recsys: requests/s, p50/p99, CPU per call
	$(BIN)/python -m benchmarks.bench_throughput --artifacts $(ARTIFACTS)

bench-rank-cut: $(BIN)/.dev build ## offline NDCG@20 and batch CPU of each two-phase cut
	$(BIN)/python -m benchmarks.bench_rank_cut --artifacts $(ARTIFACTS)

loadtest: $(BIN)/.dev ## against a server already running on 127.0.0.1:50051 (make serve)
	RECSYS_ARTIFACTS=$(ARTIFACTS) $(BIN)/locust -f loadtest/locustfile.py --headless \
	  --host 127.0.0.1:50051 -u 50 -r 50 -t 30s

loadtest-ci: $(BIN)/.dev ## small world, real server with 2 workers, 15 s of locust, drain
	bash loadtest/ci_smoke.sh $(BIN)

alerts-check: ## the Prometheus alert rules: syntax (promtool check) and unit tests (promtool test)
	promtool check rules ops/prometheus/recsys-alerts.yml
	cd ops/prometheus && promtool test rules recsys-alerts.test.yml

deploy-check: $(BIN)/.dev ## validate deploy/ against the Kubernetes API schemas (offline)
	$(BIN)/kubernetes-validate --strict --quiet deploy/*.yaml

POLICY_VENV ?= .venv-policy
policy-check: $(POLICY_VENV)/.installed ## checkov over deploy/ (0 failed checks; waivers in deploy/.checkov.yaml)
	$(POLICY_VENV)/bin/checkov -d deploy --config-file deploy/.checkov.yaml

# checkov in a venv of its own: its pinned dependencies are not the service's.
$(POLICY_VENV)/.installed: deploy/policy-requirements.txt
	test -x $(POLICY_VENV)/bin/python || $(PYTHON) -m venv $(POLICY_VENV)
	$(POLICY_VENV)/bin/python -m pip install --quiet -r deploy/policy-requirements.txt
	touch $@

deploy-monitoring: $(BIN)/.dev ## regenerate deploy/monitoring.yaml from ops/ (alert rules, dashboard)
	$(BIN)/python -m tests.test_monitoring_manifests

image-smoke: ## build the image with podman (base by debootstrap, no registry) and smoke-run it
	bash .ci/image-smoke.sh

install: $(BIN)/.runtime
install-dev: $(BIN)/.dev

$(BIN)/.runtime: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(BIN)/.dev: pyproject.toml $(BIN)/.runtime
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) $(POLICY_VENV) .mypy_cache .ruff_cache .pytest_cache
