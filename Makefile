# tunedag's two entry points. Each sets up .venv/ with what it needs on first use.
#   make run    run the whole DAG on config.yaml on this machine
#   make test   run the test suite (what CI runs)
VENV   := .venv
PYTHON := $(VENV)/bin/python
BASE   := $(VENV)/.tunedag-base
TESTS  := $(VENV)/.tunedag-test

.PHONY: run test clean-outputs

# On a machine without an NVIDIA driver, torch's CPU build (pip takes 2.13.0 from local disk
# where it lies there) goes in first, so the range in pyproject.toml pulls no CUDA build.
$(BASE): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	command -v nvidia-smi >/dev/null 2>&1 || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e .
	touch $@

# The test extras include llama-cpp-python, which compiles llama.cpp once (pip caches the wheel),
# and deepspeed, whose setup imports torch: it builds against the venv's torch (about 40 s).
$(TESTS): $(BASE)
	$(PYTHON) -m pip install -q setuptools wheel
	$(PYTHON) -m pip install -q --no-build-isolation 'deepspeed>=0.19.8'
	CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PYTHON) -m pip install -q -e '.[test]'
	touch $@

run: $(BASE)
	$(VENV)/bin/snakemake --profile profiles/local

test: $(TESTS)
	$(PYTHON) -m pytest -q

clean-outputs:
	rm -rf data/raw data/packed runs models logs .snakemake
