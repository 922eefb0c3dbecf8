# adbeacon: build, run and test. Needs GNU make and bash; everything else is
# installed on demand by scripts/deps.sh (Debian 12).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# Ports of the local stack (scripts/stack.sh); override like `make run REDIS_PORT=6380`.
CH_HTTP_PORT ?= 8123
CH_TCP_PORT ?= 19000
REDIS_PORT ?= 6379
export CH_HTTP_PORT CH_TCP_PORT REDIS_PORT

# Debian installs clickhouse-server in /usr/sbin; the integration tests look it up on PATH.
export PATH := $(PATH):/usr/sbin

ifeq ($(CI),true)
export CARGO_TERM_COLOR := never
endif

VENV_PYTHON := .data/venv/bin/python

.PHONY: help run test soak fuzz check-deploy bench bench-modes bench-replay bench-analytics loadtest stop status clean-data fmt lint openapi

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

run: ## local stack + `adbeacon serve` on :8080; Ctrl-C stops both
	bash scripts/run.sh

# One command per line so the first failure stops make.
test: ## deps, fmt check, clippy, all tests, SQL conformance, deploy files, API fuzzing (what CI runs)
	bash scripts/deps.sh test
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo test --all-targets
	$(VENV_PYTHON) tests/sql/conformance.py
	$(VENV_PYTHON) scripts/check-k8s.py
	bash scripts/check-deploy.sh
	bash scripts/fuzz.sh

# The fault-injection suite (tests/it/outage.rs), long: 30 to 60 s outages, a 5-million-event
# backlog, release build; one scenario at a time (each starts its own servers). About 20 minutes.
soak: ## the outage scenarios long: ClickHouse/Redis killed, frozen, both down, SIGKILL in replay, 5M backlog
	bash scripts/deps.sh test
	SOAK=1 cargo test --release --test it outage:: -- --test-threads=1 --nocapture

# A private ClickHouse, Redis and adbeacon on free ports; see scripts/fuzz.sh for its knobs.
fuzz: ## schemathesis against the live API: no 5xx, every answer as the OpenAPI spec says
	bash scripts/deps.sh test
	bash scripts/fuzz.sh

# No Docker engine runs here: the files are parsed and checked, and promtool checks the rules.
check-deploy: ## static checks of docker-compose.yml, the Dockerfile and deploy/ (part of `make test`)
	bash scripts/deps.sh test
	bash scripts/check-deploy.sh

# Twice: unpinned (servers and wrk share both cores: the plain `wrk` comparison), then pinned
# (server on one core, wrk on the other: the per-core cost). Each run measures bare and adbeacon.
bench: ## benchmarks: bare hyper vs adbeacon POST /ads/click, unpinned then pinned; the three ACK_MODEs; an outage and its replay
	bash scripts/deps.sh bench
	BENCH_PIN=0 bash scripts/bench.sh
	BENCH_PIN=1 bash scripts/bench.sh
	bash scripts/bench-modes.sh
	bash scripts/bench-replay.sh

bench-replay: ## ClickHouse stopped under load (spill rate), then the live p99 while the backlog replays vs at rest
	bash scripts/deps.sh bench
	bash scripts/bench-replay.sh

bench-modes: ## POST /ads/click under ACK_MODE buffered, wal and committed: saturation and half of it
	bash scripts/deps.sh bench
	bash scripts/bench-modes.sh

# Loads BENCH_EVENTS (10M) events into a private ClickHouse; report in .data/bench/analytics.md.
bench-analytics: ## GET /ads/analytics p50/p99 per timeframe vs the same SQL on raw events
	bash scripts/deps.sh bench
	bash scripts/bench-analytics.sh

# A private ClickHouse and adbeacon on free ports; knobs in scripts/loadtest.sh, scripts in loadtest/.
loadtest: ## k6 load tests (clicks, mixed, spike, soak, outage), short; fails on a threshold or a 2xx not stored
	bash scripts/deps.sh loadtest
	bash scripts/loadtest.sh

stop: ## stop the servers that scripts/stack.sh started
	bash scripts/stack.sh stop

status: ## which local servers answer, and who started them
	bash scripts/stack.sh status || true

clean-data: stop ## stop the stack, then delete .data (databases, spill queue, venv)
	rm -rf .data

fmt: ## format the code
	cargo fmt

lint: ## fmt check and clippy, as in `make test`
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

# Through a temporary file, so a failed build leaves the checked-in spec intact.
openapi: ## regenerate openapi/openapi.yaml
	mkdir -p openapi
	cargo run --quiet -- openapi > openapi/openapi.yaml.tmp || { rm -f openapi/openapi.yaml.tmp; exit 1; }
	mv openapi/openapi.yaml.tmp openapi/openapi.yaml
