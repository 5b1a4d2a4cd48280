# Two commands do everything:  make reproduce  (run the notebooks, write figures/)  and  make test.
# Both create .venv when it is missing, and reinstall only when pyproject.toml changed.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
NOTEBOOKS   := $(sort $(wildcard notebooks/[0-9]*.ipynb))
# Tests and notebooks run on the CPU with the embedded model by default.
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MPLBACKEND := Agg

.PHONY: venv test unit nbval reproduce bench clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# One pytest run: unit/property/integration tests, then strict nbval over every notebook. The notebooks'
# figures go to .pytest_cache/ here (figures/ holds the committed ones; make reproduce rewrites those).
NBVAL_FIGURES := SVDPRUNE_FIGURES=$(CURDIR)/.pytest_cache/nbval/figures
test: $(STAMP)
	$(NBVAL_FIGURES) $(PY) -m pytest -q --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg tests $(NOTEBOOKS)

unit: $(STAMP)
	$(PY) -m pytest tests -q

nbval: $(STAMP)
	$(NBVAL_FIGURES) $(PY) -m pytest -q --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg $(NOTEBOOKS)

# Executes copies of the notebooks (the committed ones are not modified); figures land in figures/.
reproduce: $(STAMP)
	$(PY) -m svdprune_utils reproduce $(NOTEBOOKS)

bench: $(STAMP)
	$(PY) benchmarks/leverage_speed.py

clean-venv:
	rm -rf $(VENV)
