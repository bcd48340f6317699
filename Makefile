# Digit Recognizer pipeline. `make help` lists the targets; `make train submit` is the main job.
# Variables on the command line override the preset: make train PRESET=quick EPOCHS=3 RUN=myrun

.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON_BASE ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= standard
# The preset is passed only when given, so `make train RUN=x` resumes x with its own preset.
PRESET_ARG := $(if $(filter command line environment,$(origin PRESET)),--preset $(PRESET))
RUN ?= $(PRESET)
SOURCE ?= auto
UPLOAD ?= 1
export PYTHONDONTWRITEBYTECODE := 1

RAW := data/raw
PROCESSED := data/processed
RUNDIR := runs/$(RUN)
SUBMISSION := submissions/submission.csv

.PHONY: FORCE help venv fetch prepare train predict ensemble submit score report test bench clean kernel kernel-push kernel-output

help: ## list the targets
	@echo "Digit Recognizer pipeline. Usage: make TARGET [PRESET=quick|standard|overnight] [RUN=name] [KEY=value ...]"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_.\/$$()-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(VENV)/.installed ## create .venv from requirements.txt (every target does this first)

$(VENV)/.installed: requirements.txt
	$(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements-dev.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

fetch: $(RAW)/train.csv ## download the competition data (SOURCE=auto|kaggle|mnist)

$(RAW)/train.csv: | $(VENV)/.installed
	$(PY) -m pipeline.fetch --source $(SOURCE)

# fetch writes test.csv before train.csv, so train.csv stands for both
$(RAW)/test.csv: $(RAW)/train.csv ;

prepare: $(PROCESSED)/meta.json ## validate, normalize and split the data

$(PROCESSED)/meta.json: $(RAW)/train.csv $(RAW)/test.csv | $(VENV)/.installed
	$(PY) -m pipeline.prepare $(if $(VAL_FRACTION),--val-fraction $(VAL_FRACTION))

train: $(RUNDIR)/summary.json ## train PRESET into runs/RUN (resumes an unfinished run)

$(RUNDIR)/summary.json: $(PROCESSED)/meta.json | $(VENV)/.installed
	$(PY) -m pipeline.train $(PRESET_ARG) --run $(RUN) $(MAKEOVERRIDES)

predict: $(RUNDIR)/test_probs.npz ## class probabilities of runs/RUN on test.csv

$(RUNDIR)/test_probs.npz: $(RUNDIR)/summary.json | $(VENV)/.installed
	$(PY) -m pipeline.predict --run $(RUN)

ensemble: ## blend the finished members of an ensemble run by validation (TTA=1 also tries shifts)
	$(PY) -m pipeline.ensemble --run $(RUN) $(if $(filter 1,$(TTA)),--tta)

submit: $(SUBMISSION) ## write submissions/submission.csv (uploads when Kaggle credentials exist and UPLOAD=1)

# The submission is rebuilt when RUN names another run: submissions/.run changes only then.
submissions/.run: FORCE
	@mkdir -p submissions; echo "$(RUN)" | cmp -s - $@ || echo "$(RUN)" > $@

$(SUBMISSION): $(RUNDIR)/test_probs.npz submissions/.run | $(VENV)/.installed
	$(PY) -m pipeline.submit --run $(RUN) --upload $(UPLOAD) $(if $(MESSAGE),--message "$(MESSAGE)")

score: $(SUBMISSION) ## accuracy of the submission against the offline answer key
	$(PY) -m pipeline.score --submission $(SUBMISSION)

report: $(RUNDIR)/report/report.md ## figures and tables of runs/RUN

$(RUNDIR)/report/report.md: $(RUNDIR)/summary.json | $(VENV)/.installed
	$(PY) -m pipeline.report --run $(RUN)

test: $(VENV)/.dev-installed ## run the tests (pytest's exit 5, no tests collected, is a failure)
	$(PY) -m pytest -q tests; code=$$?; if [ $$code -eq 5 ]; then echo 'make test: no tests collected' >&2; exit 1; fi; exit $$code

bench: $(VENV)/.dev-installed ## engine vs PyTorch throughput on this CPU
	$(PY) -m bench.bench

KERNEL_BUILD := build/kernel
KERNEL := $(KERNEL_BUILD)/kernel-metadata.json
KERNEL_SUBMISSION := submissions/kernel/submission.csv
# The notebook's settings cell gets each variable that is given. Make exports command-line variables, so the
# shell reads their values ("$$PRESET"): no value is ever pasted into the command line itself.
KERNEL_OPTIONS = $(if $(filter command line environment,$(origin PRESET)),--preset "$$PRESET") \
	$(if $(EPOCHS),--epochs "$$EPOCHS") $(if $(MAX_TIME),--max-time "$$MAX_TIME") \
	$(if $(DEVICE),--device "$$DEVICE") $(if $(SEED),--seed "$$SEED") \
	$(if $(filter 1,$(GPU)),--gpu) $(if $(filter 1,$(CONTINUE)),--continue) \
	$(if $(KAGGLE_KERNEL_ID),--id "$$KAGGLE_KERNEL_ID")

kernel: | $(VENV)/.dev-installed ## build the Kaggle notebook into build/kernel/ (PRESET EPOCHS MAX_TIME DEVICE SEED, GPU=1, CONTINUE=1)
	$(PY) -m pipeline.kernel generate $(KERNEL_OPTIONS)

# kernel-push uploads the build as it is; with no build yet, it makes one with the defaults first.
$(KERNEL): | $(VENV)/.dev-installed
	$(PY) -m pipeline.kernel generate $(KERNEL_OPTIONS)

kernel-push: | $(KERNEL) ## push build/kernel/ to Kaggle and wait until its run completes or fails
	$(PY) -m pipeline.kernel push

kernel-output: $(KERNEL_SUBMISSION) ## download the kernel's submission.csv (and log) into submissions/kernel/

# The kernel's output lives on Kaggle and changes with every run: always ask.
$(KERNEL_SUBMISSION): FORCE | $(VENV)/.installed
	$(PY) -m pipeline.kernel output

FORCE:

clean: ## remove processed data, runs and submissions (keeps data/raw and .venv)
	rm -rf $(PROCESSED)/* runs/*/ $(SUBMISSION)
