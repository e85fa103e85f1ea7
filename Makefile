# Two commands do all set-up on a fresh machine (Python 3.10+):
#   make demo   create .venv, install, run the main job (real photos -> shards -> 2-rank ZeRO-3 training)
#   make test   create/reuse .venv, install, run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU install: torch 2.13.0 is the CPU build (any other spec pulls a multi-GB CUDA build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]" "$(TORCH_SPEC)"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/phi3v-train demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf $(VENV) runs .pytest_cache
