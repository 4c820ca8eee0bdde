# Two commands do all the set-up:  `make demo`  and  `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install demo test lint clean

# Compiles the Rust engine into bulba/ (maturin) and installs every dependency,
# including llama-cpp-python (compiled from source once; pip caches the wheel).
install: .install.stamp
.install.stamp: pyproject.toml rust_loader/Cargo.toml $(wildcard rust_loader/src/*.rs)
	$(PIP) install -e ".[test]"
	@touch $@

# The whole pipeline on the shipped demo corpus: prepare -> train (tiny) -> export -> verify.
demo: install
	$(PYTHON) scripts/demo.py

# Lints first (ruff for Python, clippy for Rust), the Rust crate's own tests, then the Python
# suite (real MLflow server, real llama.cpp, real corpus from ../shared/corpus).
test: install lint
	cd rust_loader && cargo test --quiet
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	cd rust_loader && cargo clippy --all-targets --quiet -- -D warnings

clean:
	rm -rf .install.stamp data/demo runs/demo output_models/demo-*
