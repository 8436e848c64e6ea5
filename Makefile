# One command each: `make demo` sets up a virtual environment and renders the demo video;
# `make test` sets up the same environment and runs the test suite.
# VENV is where the environment lives (.ci/run points it at a new, empty folder on every run).
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch 2.13 (installs from the local package index); set TORCH= to keep an installed torch.
TORCH ?= torch==2.13.0
DEMO_ARGS ?= --synthetic-weights --duration 1
BIN := $(VENV)/bin

.PHONY: setup demo test test-heavy conformance

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[torch,dev,serve,triton]'
	# tritonserver 2.51 and its Python backend for local serving and tests; --no-deps: the wheel pins numpy<2,
	# and only its bundled binary and stubs are used (they run under numpy 2 through DLPack).
	$(BIN)/python -m pip install --quiet --no-deps nvidia-pytriton==0.7.0

demo: setup
	mkdir -p out
	$(BIN)/sadtalker-rt run sadtalker_rt/assets/astronaut.jpg sadtalker_rt/assets/speech.wav -o out/demo.mp4 --overwrite $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q

test-heavy: setup
	$(BIN)/python -m pytest -q -m heavy

conformance: setup
	$(BIN)/sadtalker-rt conformance ../shared/conformance
