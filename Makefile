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

# The Rust crate's own tests and lints first, then the Python suite (real MLflow server,
# real llama.cpp, real corpus from ../shared/corpus).
test: install
	cd rust_loader && cargo test --quiet && cargo clippy --all-targets --quiet -- -D warnings
	$(PYTHON) -m pytest -q

clean:
	rm -rf .install.stamp data/demo runs/demo output_models/demo-*
