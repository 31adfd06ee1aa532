# Two commands do everything on a fresh machine with Python >= 3.10:
#   make demo   install, train the production branch's tiny preset on the embedded demo
#               corpus, and write a generated MIDI with its piano roll and audio (paths and
#               the command that opens the listening room printed at the end)
#   make test   install with test extras and run the test suite
# Inside an active virtual environment, that environment is used; otherwise ./.venv is made.
# torch: if none is installed, torch==2.13.0 is installed first. GPU users: install the CUDA
# build of torch for your platform first (https://pytorch.org), and it is kept.

PYTHON ?= python3
ifdef VIRTUAL_ENV
  VENV := $(VIRTUAL_ENV)
else
  VENV := .venv
endif
PY := $(VENV)/bin/python
RUN ?= runs/demo
STAMP := $(VENV)/.mehldau-installed

.PHONY: demo test install lint bench clean-demo

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==2.13.0"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf $(RUN)
	$(VENV)/bin/mehldau-train run_dir=$(RUN)
	$(VENV)/bin/mehldau-generate ckpt=$(RUN) out=$(RUN)/generated.mid seconds=30 render=true
	@echo "demo: generated MIDI at $(RUN)/generated.mid (demo corpus, not Mehldau);"
	@echo "      piano roll $(RUN)/generated.png, audio $(RUN)/generated.wav (with fluidsynth)"
	@echo "demo: hear and play with it in the browser: $(VENV)/bin/mehldau-app app.runs=[$(dir $(RUN))]"
	@echo "      then open http://127.0.0.1:7860"

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/production.py
