# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-unit chaos bench lint check-config system-deps clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "Could not create $(VENV): install python3-venv (apt-get install python3-venv)"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## Start the daemon on the shipped config.yaml (SMTP intake on 127.0.0.1:2525, mail to var/outbox/).
run: $(STAMP)
	$(BIN)/mailrouter --config config.yaml run

## The real servers the integration tests talk to (Dovecot for IMAP, PostgreSQL: the suite
## starts a private cluster of its own, the package's service is not used), chromium (the
## digest is rendered in it), and systemd-analyze
## (tests/e2e/test_install.py verifies deploy/mailrouter.service with it).
system-deps:
	@missing=""; \
	command -v dovecot >/dev/null 2>&1 || test -x /usr/sbin/dovecot || missing=" dovecot-imapd"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 \
	  || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "Missing:$$missing: run 'sudo apt-get install$$missing' (needed by the tests)"; exit 1; \
	  fi; \
	fi

## Install what is missing, then run the whole suite.
test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

## The unit tests alone (the core on an in-memory book, parsing, config): seconds, no servers.
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

## The long fault-injection runs (300 escalations, 20 kill -9, a 30 s IMAP outage...).
chaos: $(STAMP) system-deps
	CHAOS_SCALE=full $(BIN)/python -m pytest -q -m chaos tests/e2e/test_chaos.py

## Throughput, latency and memory against the same-run ceiling (writes var/bench/results.json).
bench: $(STAMP) system-deps
	$(BIN)/python -m bench.run $(BENCH_ARGS)

## Style, types, and the architecture's import rules (ARCHITECTURE.md).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy mailrouter bench tests
	$(BIN)/lint-imports

check-config: $(STAMP)
	$(BIN)/mailrouter --config config.yaml check-config

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
