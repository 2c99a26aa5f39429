# opsgate: `make test` on a fresh clone installs everything it needs and runs every test.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test unit integration lint typecheck system-deps oidc-deps postgres venv bench demo clean screenshots

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The `opa` extra (OPA's Go evaluator) declares Python >= 3.14 yet runs on 3.11.
	$(BIN)/python -m pip install -q --ignore-requires-python 'opa-golib-python-bindings>=0.4.4'
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

postgres:
	@bash scripts/ensure-postgres.sh

oidc-deps: system-deps
	@bash scripts/oidc-deps.sh

lint: venv
	$(BIN)/ruff check opsgate tests bench
	$(BIN)/ruff format --check opsgate tests bench
	$(BIN)/mypy

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest tests/unit -q

integration: venv system-deps oidc-deps postgres
	$(BIN)/pytest tests/integration -q

test: venv system-deps oidc-deps postgres
	$(BIN)/ruff check opsgate tests bench
	$(BIN)/mypy
	$(BIN)/opsgate policy test --policies policies
	$(BIN)/pytest -q

# The README's console pictures (docs/console*.png), taken by the console tests in a real
# run: Chromium against a real server, OpenID provider and Prometheus.
screenshots: venv system-deps oidc-deps postgres
	OPSGATE_CONSOLE_SCREENSHOT=1 $(BIN)/pytest -q tests/integration/test_console.py \
		-k "approvers or live_chart"

bench: venv system-deps postgres
	$(BIN)/python bench/propose.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/reaction.py
	$(BIN)/python bench/evidence.py
	$(BIN)/python bench/fanout.py
	$(BIN)/python bench/workers.py
	$(BIN)/python bench/report.py
	$(BIN)/python bench/startup.py

# The whole loop on this machine in about a minute; `make demo DEMO_ARGS=--keep` leaves the
# demo service and Prometheus running. Needs only a Prometheus binary (scripts/demo-deps.sh).
demo: venv
	@bash scripts/demo-deps.sh
	$(BIN)/opsgate demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
