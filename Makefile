# ksm: developer tasks. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

.PHONY: venv
venv: $(STAMP) ## Create the virtualenv with the development tools

.PHONY: dev
dev: venv ## Build the extension in release mode into the virtualenv
	$(VENV)/bin/maturin develop --release -q

.PHONY: install
install: venv ## Build a wheel and install it into the virtualenv
	$(VENV)/bin/maturin build --release -q -o target/wheels
	$(PY) -m pip install -q --force-reinstall --no-deps target/wheels/ksm-*.whl

.PHONY: wheels
wheels: venv ## Build the abi3 release wheel (CPython >= 3.11); install and run it in a fresh venv of every CPython found here
	KSM_WHEEL_PYTHONS="$${KSM_WHEEL_PYTHONS:-$$(for v in 3.11 3.12 3.13 3.14 3.13t 3.14t; do \
		for p in $$(command -v python$$v) $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/*/bin/python$$v 2>/dev/null); do \
			if $$p -c '' 2>/dev/null; then echo $$p; break; fi; done; done)}" \
		$(PY) -m pytest tests/test_packaging.py -q -rA

.PHONY: demo
demo: dev ## Run the main job: `ksm demo` on the Python standard library's files
	$(VENV)/bin/ksm demo

.PHONY: fmt
fmt: venv ## Format Rust and Python code
	cargo fmt
	$(VENV)/bin/ruff format python tests benches
	$(VENV)/bin/ruff check --fix python tests benches

.PHONY: lint
lint: dev ## Lint: rustfmt, clippy (both feature sets, and the fuzz crate), ruff, mypy --strict, stubtest
	@! git grep -nE '^(<<<<<<<|>>>>>>>)( |$$)' -- . || { echo "merge conflict markers left (above)"; exit 1; }
	cargo fmt --check
	cargo fmt --check --manifest-path fuzz/Cargo.toml
	cargo clippy --all-targets -- -D warnings
	cargo clippy --no-default-features --all-targets -- -D warnings
	cd fuzz && cargo clippy --release --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/mypy --strict python tests benches
	$(VENV)/bin/python -m mypy.stubtest ksm._ksm --allowlist stubtest-allowlist.txt

.PHONY: test
test: lint ## Everything CI runs: lint, Rust tests, pytest (hypothesis profile: KSM_HYPOTHESIS_PROFILE)
	cargo test --no-default-features
	cd fuzz && cargo test --release -q   # the fuzz targets' logic on pseudo-random inputs, and every committed corpus input (fuzz/corpus)
	$(VENV)/bin/python -m pytest tests -q

.PHONY: fuzz
fuzz: ## Run every fuzz target for FUZZ_SECONDS (default 30) each
	bash fuzz/run.sh $${FUZZ_SECONDS:-30}

.PHONY: soak
soak: dev ## Mixed load for SOAK_SECONDS (default 3600), every byte checked each second (not in CI)
	$(VENV)/bin/ksm soak --seconds $${SOAK_SECONDS:-3600} $${SOAK_ARGS:-}

.PHONY: bench
bench: dev ## Side-by-side benchmarks against kernel KSM
	$(VENV)/bin/ksm bench

.PHONY: clean
clean: ## Remove build outputs and the virtualenv
	cargo clean
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
