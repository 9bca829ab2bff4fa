# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv with pip when
# missing and installs the project into it (pip, not uv/poetry: torch is served from local disk).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/auglocal-convert --model resnet50 --blocks 16

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

# the slow tier (torchrun pipelines, a benchmark run, ill-conditioned exports; about 5 minutes on 2 cores)
test-slow: $(VENV)/.installed-dev
	$(PY) -m pytest -q -m slow -p no:logging

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check auglocal_fx tests tools

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
