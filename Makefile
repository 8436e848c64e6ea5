# One command each: `make demo` sets up and renders the demo video; `make test` runs the test suite.
PYTHON ?= python3
# The CPU build of torch 2.13; set TORCH= to keep an installed torch.
TORCH ?= torch==2.13.0
DEMO_ARGS ?= --synthetic-weights --duration 1

.PHONY: setup demo test test-heavy conformance

setup:
	$(PYTHON) -m pip install --quiet $(TORCH)
	$(PYTHON) -m pip install --quiet -e '.[torch,dev]'

demo: setup
	mkdir -p out
	sadtalker-rt run sadtalker_rt/assets/astronaut.jpg sadtalker_rt/assets/speech.wav -o out/demo.mp4 --overwrite $(DEMO_ARGS)

test: setup
	$(PYTHON) -m pytest -q

test-heavy: setup
	$(PYTHON) -m pytest -q -m heavy

conformance: setup
	sadtalker-rt conformance ../shared/conformance
