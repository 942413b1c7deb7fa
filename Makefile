# The venv is built on first use and brought up to date when a requirements file changes:
# requirements.txt for running the service, requirements-dev.txt on top for tests and checks.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
RUNTIME := $(BIN)/.installed
DEV := $(BIN)/.installed-dev
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run migrate test chaos lint train report bench bench-monitoring bench-audit rehearse image mutants clean

$(RUNTIME): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(DEV): $(RUNTIME) requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

## run: serve the API exactly as the Procfile's web: line does (PORT defaults to 8000)
# `set -m`: the service runs as the terminal's foreground job, so Ctrl-C reaches it (and its
# clean shutdown) but not make, which would print "*** Interrupt" and exit 130 (`exit` after it
# keeps bash from exec'ing the service, which would leave it in make's process group). The service
# exits 143/130 after a clean shutdown on SIGTERM/SIGINT: not an error.
run: $(RUNTIME)
	bash -c "set -m; $$(sed -n 's/^web: //p' Procfile); exit \$$?"; code=$$?; [ $$code -eq 143 ] || [ $$code -eq 130 ] || exit $$code

## migrate: bring the database schema up to date (the Procfile's release: line)
migrate: $(RUNTIME)
	bash -c "$$(sed -n 's/^release: //p' Procfile)"

## test: the whole suite against the PostgreSQL and Redis on this machine
test: $(DEV)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## chaos: the long chaos suite (load, signals, outages, hostile connections); `make test` runs the short one
chaos: $(DEV)
	CHAOS=long $(BIN)/python -m pytest tests/chaos $(PYTEST_ARGS)

## lint: ruff, mypy, and the Kubernetes manifests against the API schema
lint: $(DEV)
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench
	$(BIN)/mypy
	$(BIN)/kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml

## train: train a new version into the registry (KIND=logistic|boosting, SEED=n, VERSION=name; commit it to ship it)
train: $(RUNTIME)
	$(BIN)/python -m service.training --registry artifacts/models --kind $(or $(KIND),logistic) \
		$(if $(SEED),--seed $(SEED)) $(if $(VERSION),--version $(VERSION))

## report: an HTML model report (plots embedded) from the configured database: var/model-report.html (REPORT_ARGS: --since, --until, --model-version, --output)
report: $(RUNTIME)
	$(BIN)/python -m service.report $(REPORT_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

## bench: wrk against the service and a decode-only ceiling (saturated), a boosting challenger's cost, latency at a fixed load, an outage, overload; writes bench/RESULTS.md
bench: $(DEV)
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.challenger
	$(BIN)/python -m bench.latency

## bench-monitoring: GET /monitoring on 10 thousand, 100 thousand and 1 million decisions (about 2 minutes)
bench-monitoring: $(DEV)
	$(BIN)/python -m bench.monitoring

## image: build the Dockerfile's image with buildah, on a base made from Debian packages (no registry needed)
image:
	deploy/image/build

## rehearse: three replicas behind HAProxy, through PgBouncer, restarted one at a time under load (about a minute; IMAGE=... runs them from `make image`'s image)
rehearse: $(DEV)
	$(BIN)/python -m bench.rehearse $(if $(IMAGE),--image $(IMAGE))

## bench-audit: the search on 1 million decisions (plans and times) and retention's rate (about 2 minutes)
bench-audit: $(DEV)
	$(BIN)/python -m bench.audit

## mutants: one deliberate bug at a time against the tests that must catch it; prints killed/survived (about 5 minutes)
mutants: $(DEV)
	$(BIN)/python -m tests.mutants
