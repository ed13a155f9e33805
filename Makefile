# Set-up and entry points. `make test` and `make demo` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo readme bench bench-quick gpu-wheels clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests gpu_tests

demo: $(STAMP)
	$(VENV)/bin/bayesdream-ext demo

# Rewrite the command outputs README.md shows (<!-- readme-output: COMMAND --> blocks).
readme: $(STAMP)
	$(PY) -m tests.readme_snippets update README.md

bench-quick: $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) -m bench --quick

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) -m bench

# What gpu_tests/run.sh installs on a GPU node without network: pyro-ppl and its pure-Python
# dependencies, pytest and its own, as py3-none-any wheels for the node's Python 3.12 (~3 MB).
GPU_WHEELS_DIR ?= gpu_tests/wheels
GPU_WHEELS ?= pyro-ppl==1.9.2 opt-einsum==3.4.0 pyro-api==0.1.2 pytest==9.2.0 iniconfig==2.3.1 \
	pluggy==1.7.0 packaging==26.4 pygments==2.21.0

gpu-wheels:
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
		--implementation py --abi none --platform any --no-deps -d $(GPU_WHEELS_DIR) $(GPU_WHEELS)

clean:
	rm -rf $(VENV) build *.egg-info
