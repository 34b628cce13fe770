# tunedag's two entry points. Both set up .venv/ on first use.
#   make run    run the whole DAG on config.yaml on this machine
#   make test   run the test suite (what CI runs)
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.tunedag-installed

.PHONY: run test venv clean-outputs

venv: $(STAMP)

# On a machine without an NVIDIA driver, torch's CPU build (pip takes 2.13.0 from local disk
# where it lies there) goes in first, so the range in pyproject.toml pulls no CUDA build.
$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	command -v nvidia-smi >/dev/null 2>&1 || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/snakemake --profile profiles/local

test: $(STAMP)
	$(PYTHON) -m pytest -q

clean-outputs:
	rm -rf data/raw data/packed runs models .snakemake
