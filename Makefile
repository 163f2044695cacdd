# Stage by stage:  make data|finetune|mean-prompt|predict|evaluate|score|compare|export|kaggle-bundle [CONFIG=configs/X.yaml] [ARGS="key=value ..."]
# Everything:      make all CONFIG=configs/kaggle_tpu_v3_8.yaml REQUIREMENTS=requirements-tpu.txt
# Newcomers:       make demo   (embedded default, CPU)    make test
# Without CONFIG every target uses configs/cpu_tiny.yaml, the embedded default.
# VERBOSE=1 shows the native libraries' start-up lines and every traceback.

PYTHON ?= python3
REQUIREMENTS ?= requirements-cpu.txt
CONFIG ?=
ARGS ?=
# In a Kaggle notebook (KAGGLE_KERNEL_RUN_TYPE set) the venv goes to /tmp: a
# clone lands in /kaggle/working, whose 20 GB cap TensorFlow, libtpu and
# jaxlib would take about 3.5 GB of.
VENV ?= $(if $(KAGGLE_KERNEL_RUN_TYPE),/tmp/prompt-recovery-venv,.venv)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(basename $(notdir $(REQUIREMENTS)))
RUN = $(PY) scripts/$(1).py $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

.PHONY: install tpu-pod demo test test-fast lint pod-test kill-test all data finetune predict evaluate score mean-prompt compare export kaggle-bundle sweep memory-plan plan-check preflight model-table docs-tables bench tiny tiny-default clean

$(STAMP): $(REQUIREMENTS) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r $(REQUIREMENTS)
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP)

tiny: $(STAMP)
	$(PY) scripts/build_tiny.py

# What the embedded default's stages use (the tiny Gemma, the encoder);
# `make tiny` adds the other families' stand-ins.
tiny-default: $(STAMP)
	$(PY) scripts/build_tiny.py --default-only

demo: $(STAMP)
	PYTHONUNBUFFERED=1 $(call RUN,demo)

# Both print the 20 slowest tests at the end, and run the tests on
# TEST_WORKERS pytest-xdist workers (tests/conftest.py groups them).
TEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest --durations=20 -n $(TEST_WORKERS) --dist loadgroup

test: $(STAMP)
	$(PYTEST) tests

test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

# ruff (pyproject.toml): the formatter's check, then the linter.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

pod-test: $(STAMP)
	$(PY) -m pytest -m pod tests

kill-test: $(STAMP)
	$(PY) -m pytest -m kill tests

data finetune predict evaluate score: $(STAMP) $(if $(CONFIG),,tiny-default)
	PYTHONUNBUFFERED=1 $(call RUN,$@)

mean-prompt: $(STAMP) $(if $(CONFIG),,tiny-default)
	PYTHONUNBUFFERED=1 $(call RUN,mean_prompt)

compare: $(STAMP) $(if $(CONFIG),,tiny-default)
	PYTHONUNBUFFERED=1 $(call RUN,compare)

export: $(STAMP) $(if $(CONFIG),,tiny-default)
	PYTHONUNBUFFERED=1 $(call RUN,export)

# One finetune per setting of a grid: make sweep ARGS="lora.rank=[2,4,16,64] train.learning_rate=[1e-4,2e-4]"
sweep: $(STAMP) $(if $(CONFIG),,tiny-default)
	PYTHONUNBUFFERED=1 $(call RUN,sweep)

# Needs the package index (it downloads the notebook's wheels); the notebook does not.
kaggle-bundle: $(STAMP) $(if $(CONFIG),,tiny-default)
	PYTHONUNBUFFERED=1 $(call RUN,kaggle_bundle)

memory-plan: $(STAMP) $(if $(CONFIG),,tiny-default)
	$(call RUN,memory_plan)

# Can this machine read the preset and the encoder and write the run? (tpu_pod.py setup runs it on worker 0)
preflight: $(STAMP) $(if $(CONFIG),,tiny-default)
	$(call RUN,preflight)

model-table: $(STAMP)
	$(PY) scripts/model_table.py

# The tables of docs/ that the code computes, written into their pages.
docs-tables: $(STAMP)
	$(PY) scripts/docs_tables.py

# The memory plan against XLA for the model table's architectures, compiled
# from shapes on virtual CPU devices (no weights); see bench/plan_check.py.
plan-check: $(STAMP)
	PYTHONUNBUFFERED=1 $(PY) bench/plan_check.py $(ARGS)

bench: $(STAMP) tiny-default
	PYTHONUNBUFFERED=1 $(PY) bench/throughput.py
	PYTHONUNBUFFERED=1 $(PY) bench/mean_prompt_bench.py

# The stages of a whole run, in order (scripts/tpu_pod.py runs the same list).
ALL_STAGES := data finetune mean-prompt predict evaluate
all: $(STAMP) $(if $(CONFIG),,tiny-default)
	$(MAKE) $(ALL_STAGES) CONFIG=$(CONFIG) ARGS="$(ARGS)" REQUIREMENTS=$(REQUIREMENTS)

# Cloud TPU slices: make tpu-pod POD="up --name NAME --zone ZONE --data FILE --stage all [--dry-run]"
tpu-pod:
	$(PYTHON) scripts/tpu_pod.py $(POD)

clean:
	rm -rf runs artifacts
