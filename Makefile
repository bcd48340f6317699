# Digit Recognizer pipeline. `make help` lists the targets; `make train submit` is the main job.
# Variables on the command line override the preset: make train PRESET=quick EPOCHS=3 RUN=myrun

.DEFAULT_GOAL := help
# make's own shell and its flags are no settings: given on the command line (`.SHELLFLAGS='-c touch x;'`) they ran
# as shell code in every $(shell ...) and recipe, `make help` included; refused before anything runs. SHELL= may
# name another bash (where /bin/bash is missing): an absolute path of an existing file named bash.
ifneq ($(filter command% environment%,$(origin .SHELLFLAGS)),)
$(error .SHELLFLAGS= is make's own shell setting, not one of the pipeline's)
endif
ifneq ($(filter command% environment%,$(origin SHELL)),)
ifeq ($(and $(filter /%/bash,$(value SHELL)),$(if $(word 2,$(value SHELL)),,1),$(filter $(value SHELL),$(wildcard $(value SHELL)))),)
$(error SHELL='$(value SHELL)' is make's own shell setting: only a bash may be named, by its absolute path, e.g. SHELL=/usr/local/bin/bash)
endif
endif
SHELL := /bin/bash
# Every variable given on the command line, for train to read as KEY=value settings (stage variables aside).
CMDLINE_VARS := $(sort $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v))))
# Each held as the text typed, never make code: make expands a command-line variable wherever it is read and
# whenever it exports it to a recipe, so `MESSAGE='$(shell ...)'` ran its command even in `make help`.
$(foreach v,$(CMDLINE_VARS),$(eval override export $(v) := $$(value $(v))))
# The same for the variables this Makefile reads when they come from the environment (`RUN=... make train`).
READ_VARS := PRESET RUN SOURCE UPLOAD MESSAGE TTA GPU CONTINUE VAL_FRACTION KAGGLE_KERNEL_ID PYTHON_BASE VENV \
  EPOCHS MAX_TIME DEVICE SEED
# The training settings among them reach train as command-line ones do (`SEED=1 make train` trained seed 0).
ENV_SETTINGS := $(strip $(foreach v,EPOCHS MAX_TIME DEVICE SEED VAL_FRACTION,$(if $(and $(filter environment,$(origin $(v))),$(value $(v))),$(v))))
export PIPELINE_ENV_SETTINGS := $(ENV_SETTINGS)
$(foreach v,$(READ_VARS),$(if $(filter environment,$(origin $(v))),$(eval override export $(v) := $$(value $(v)))))

# The first of python3, python3.11, python3.12, ... that runs and is 3.11 or newer, unless PYTHON_BASE names
# one. Each is run, not just looked up: a pyenv shim is on PATH for versions it cannot start.
ifeq ($(origin PYTHON_BASE),undefined)
PYTHON_BASE := $(shell for p in python3 python3.11 python3.12 python3.13 python3.14 python3.15 python3.16; do \
  $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && { echo $$p; break; }; done)
endif
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= standard
# The preset is passed only when given, so `make train RUN=x` resumes x with its own preset.
PRESET_ARG := $(if $(filter override environment,$(origin PRESET)),--preset $(PRESET))
RUN ?= $(PRESET)
SOURCE ?= auto
UPLOAD ?= 1
export PYTHONDONTWRITEBYTECODE := 1

# What a user types reaches Python as data: PRESET and RUN are checked here before any recipe uses them,
# every other value travels in an environment variable PIPELINE_VAR_<NAME> holding its text unexpanded.
name_chars := a b c d e f g h i j k l m n o p q r s t u v w x y z A B C D E F G H I J K L M N O P Q R S T U V W X Y Z \
              0 1 2 3 4 5 6 7 8 9 _ . -
strip_chars = $(if $(2),$(call strip_chars,$(subst $(firstword $(2)),,$(1)),$(wordlist 2,999,$(2))),$(1))
# A name begins with a letter or digit: `RUN=-x` reached train as an option, `PRESET=..` named a folder.
not_a_name = $(or $(if $(strip $(1)),,empty),$(filter -% .% _%,$(1)),\
  $(subst $(eval) ,<space>,$(call strip_chars,$(subst /members/,,$(1)),$(name_chars))))
ifneq ($(call not_a_name,$(PRESET)),)
$(error PRESET='$(PRESET)' is not a preset name: use one of $(basename $(notdir $(wildcard configs/*.toml))))
endif
ifneq ($(call not_a_name,$(RUN)),)
$(error RUN='$(RUN)' is not a run name: use letters, digits, '.', '_' and '-', beginning with a letter or digit (or NAME/members/K))
endif
# VENV is pasted into every recipe (as $(PY)): a path of name characters and '/', nothing bash would read as code.
ifneq ($(or $(if $(strip $(VENV)),,empty),$(subst $(eval) ,<space>,$(call strip_chars,$(subst /,,$(VENV)),$(name_chars)))),)
$(error VENV='$(VENV)' is not a folder name: use letters, digits, '.', '_', '-' and '/')
endif
# Make's variables are case-sensitive: `make submit run=x` or `Upload=0` would leave RUN or UPLOAD as they were,
# and submit another run or upload. Any spelling of one of these names but its own is refused.
upper = $(strip $(subst a,A,$(subst b,B,$(subst c,C,$(subst d,D,$(subst e,E,$(subst f,F,$(subst g,G,$(subst h,H,$(subst i,I,\
  $(subst j,J,$(subst k,K,$(subst l,L,$(subst m,M,$(subst n,N,$(subst o,O,$(subst p,P,$(subst q,Q,$(subst r,R,\
  $(subst s,S,$(subst t,T,$(subst u,U,$(subst v,V,$(subst w,W,$(subst x,X,$(subst y,Y,$(subst z,Z,$(1))))))))))))))))))))))))))))
CASED_VARS := RUN PRESET SOURCE UPLOAD MESSAGE TTA GPU CONTINUE FORCE VAL_FRACTION KAGGLE_KERNEL_ID PYTHON_BASE VENV
$(foreach v,$(CMDLINE_VARS),$(if $(and $(if $(findstring %,$(v)),,1),$(filter-out $(v),$(call upper,$(v))),\
  $(filter $(call upper,$(v)),$(CASED_VARS))),\
  $(error $(v)= is not read: make's variables are case-sensitive, write $(call upper,$(v))=)))
# Names the Makefile keeps for itself: given on the command line they were pasted into recipes as typed
# (`make clean PROCESSED='data/my x'` ran rm -rf on data/my and on x).
INTERNAL_VARS := CMDLINE_VARS READ_VARS ENV_SETTINGS INTERNAL_VARS PY PRESET_ARG PREDICT_TTA FORCE_GIVEN SUBMIT_FORCE name_chars strip_chars not_a_name \
  upper CASED_VARS \
  RAW PROCESSED RUNDIR SUBMISSION SUBMITTED_RUN KERNEL_BUILD KERNEL KERNEL_SUBMISSION KERNEL_OPTIONS CLEANED PREPARE_LOCK
$(foreach v,$(filter $(INTERNAL_VARS),$(CMDLINE_VARS)),$(error $(v)= is a name this Makefile keeps for itself, not a setting))
# The switches are 0 or 1: `make kernel GPU=yes` built a CPU session, `make ensemble TTA=true` tried no shifts.
$(foreach v,TTA GPU CONTINUE UPLOAD $(filter FORCE,$(CMDLINE_VARS)),$(if $(filter-out 0 1,$(value $(v))),\
  $(error $(v)='$(value $(v))' is not a switch: use $(v)=1 or $(v)=0)))
# FORCE is read from the command line only: one exported for something else never forces anything.
FORCE_GIVEN := $(if $(filter FORCE,$(CMDLINE_VARS)),$(filter 1,$(FORCE)))
# submit takes it (a run that did not learn, submitted all the same) only when train is not a goal too: the
# FORCE=1 of `make train submit LR=50 FORCE=1` is train's, for the changed LR.
SUBMIT_FORCE := $(if $(and $(FORCE_GIVEN),$(if $(filter train,$(MAKECMDGOALS)),,1)),--force)
export PIPELINE_MAKE_VARS := $(sort $(CMDLINE_VARS) $(ENV_SETTINGS))
$(foreach v,$(sort $(CMDLINE_VARS) $(ENV_SETTINGS) MESSAGE SOURCE UPLOAD VAL_FRACTION KAGGLE_KERNEL_ID PYTHON_BASE),\
  $(eval export PIPELINE_VAR_$(v) := $$(value $(v))))

RAW := data/raw
PROCESSED := data/processed
RUNDIR := runs/$(RUN)
SUBMISSION := submissions/submission.csv

.PHONY: FORCE help venv fetch prepare train predict ensemble submit score report test bench clean kernel kernel-push kernel-output

help: ## list the targets
	@echo "Digit Recognizer pipeline. Usage: make TARGET [PRESET=quick|standard|overnight] [RUN=name] [KEY=value ...]"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_.\/$$()-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(VENV)/.installed ## create .venv from requirements.txt (every target but help and clean does this first)

$(VENV)/.installed: requirements.txt
	$(if $(PYTHON_BASE),,$(error no python3.11 or newer found on PATH: install one, or name it with PYTHON_BASE=...))
	@"$$PIPELINE_VAR_PYTHON_BASE" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { echo "error: PYTHON_BASE=$$PIPELINE_VAR_PYTHON_BASE is not a Python 3.11 or newer" >&2; exit 2; }
	"$$PIPELINE_VAR_PYTHON_BASE" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements-dev.txt requirements-kernel.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Building the notebook needs nbformat only: `make kernel` never installs the test tools (PyTorch among them).
$(VENV)/.kernel-installed: requirements-kernel.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-kernel.txt
	touch $@

fetch: | $(VENV)/.installed ## download the competition data (SOURCE=auto|kaggle|mnist; again when SOURCE names another)
	$(PY) -m pipeline.fetch --source "$$PIPELINE_VAR_SOURCE" --if-needed

# fetch writes both (train.csv last); `&:` makes them one target, so make never believes one was rebuilt alone.
# A fetch cut short while it moved its files in leaves data/raw/.fetch-incomplete: they are fetched again.
$(RAW)/train.csv $(RAW)/test.csv &: $(if $(wildcard $(RAW)/.fetch-incomplete),FORCE) | $(VENV)/.installed
	$(PY) -m pipeline.fetch --source "$$PIPELINE_VAR_SOURCE"

# Dates cannot tell whether data/processed holds data/raw (an unzip or `cp -p` gives new CSVs old dates), nor
# whether VAL_FRACTION asks for another split: prepare is always asked, and compares the CSVs' sha256 and the
# split with meta.json (well under a second when nothing changed). predict and submit never prepare: submit
# refuses a test.csv that is not the one prepared. (`make -n prepare submit` cannot know whether prepare will
# write: it lists what the dates of now ask for, and a real run predicts again after a prepare that wrote.)
# `make train VAL_FRACTION=...` splits the data again for RUN: train is asked first whether it would take the
# setting, so that a run it refuses (one started on another split) does not leave every other run's split changed.
prepare: $(RAW)/train.csv $(RAW)/test.csv | $(VENV)/.installed ## validate, normalize and split the data (again when the CSVs or VAL_FRACTION changed)
	$(if $(and $(VAL_FRACTION),$(filter train,$(MAKECMDGOALS))),$(PY) -m pipeline.train $(PRESET_ARG) --run $(RUN) --make-vars --check-config)
	$(PY) -m pipeline.prepare --if-needed $(if $(VAL_FRACTION),--val-fraction "$$PIPELINE_VAR_VAL_FRACTION")

# The stages below always ask the run (cheap when there is nothing to do): it knows what is finished and
# what its outputs were made from, which file dates cannot tell.
train: prepare | $(VENV)/.installed ## train PRESET into runs/RUN (resumes an unfinished run, repairs a damaged one)
	$(PY) -m pipeline.train $(PRESET_ARG) --run $(RUN) --make-vars

# TTA=0|1 given to predict or submit says whether an ensemble's blend tries test-time shifts (`make ensemble
# TTA=1` does); it was ignored there, and the blend of the last `make ensemble` kept. Not given: as that blend.
PREDICT_TTA := $(if $(TTA),--tta $(TTA))

predict: | $(VENV)/.installed ## class probabilities of runs/RUN on test.csv (recomputed when the data or model changed)
	$(PY) -m pipeline.predict --run $(RUN) $(PREDICT_TTA)

# Recomputed when the run (or a member of it) delivered since, or the data changed, but never trains, fetches
# or prepares: `make submit RUN=typo` is refused in one line, where it trained the default preset for 30 minutes
# and uploaded it; an ensemble stopped by MAX_TIME is blended from its finished members instead of trained on.
# The files are listed when make starts, before a recipe runs: in `make train submit` the training itself is
# the prerequisite, so what it delivers is predicted (predict does nothing when the probabilities are current).
$(RUNDIR)/test_probs.npz: $(wildcard $(RUNDIR)/summary.json $(RUNDIR)/members/*/summary.json $(PROCESSED)/meta.json) \
  $(filter train,$(MAKECMDGOALS)) $(if $(TTA),FORCE) | $(VENV)/.installed
	$(PY) -m pipeline.predict --run $(RUN) $(PREDICT_TTA)

ensemble: | $(VENV)/.installed ## blend the finished members of an ensemble run by validation (TTA=1 also tries shifts)
	$(PY) -m pipeline.ensemble --run $(RUN) $(if $(filter 1,$(TTA)),--tta)

# The submission is rebuilt when RUN names another run than submissions/.run, the run pipeline.submit wrote it
# from (decided here rather than by a FORCE'd file, so that `make -n submit` tells the truth).
# Without the record submit writes beside it (.submission.json, written first), the CSV is written again too.
SUBMITTED_RUN := $(shell [ -f submissions/.submission.json ] && cat submissions/.run 2>/dev/null)

$(SUBMISSION): $(RUNDIR)/test_probs.npz $(if $(filter-out $(RUN),$(SUBMITTED_RUN))$(if $(SUBMITTED_RUN),,none),FORCE) | $(VENV)/.installed
	$(PY) -m pipeline.submit --run $(RUN) --upload 0 $(SUBMIT_FORCE)

# The upload is its own step: retried by every `make submit` until one succeeds, never repeated after that.
submit: $(SUBMISSION) | $(VENV)/.installed ## write submissions/submission.csv and upload it (credentials and UPLOAD=1), once
	$(PY) -m pipeline.submit --run $(RUN) --upload-only --upload "$$PIPELINE_VAR_UPLOAD" --message="$$PIPELINE_VAR_MESSAGE" \
	  $(SUBMIT_FORCE)

score: | $(VENV)/.installed ## accuracy of submissions/submission.csv against the offline key, naming its run (RUN= must be that run)
	$(PY) -m pipeline.score --submission $(SUBMISSION) $(if $(filter command line environment override,$(origin RUN)),--run $(RUN))

report: $(RUNDIR)/report/report.md ## figures and tables of runs/RUN

# Redrawn when the run's summary changes, but never trains: a mistyped or unfinished RUN is said in one line
# rather than a 30-minute training of the default preset started.
$(RUNDIR)/report/report.md: $(wildcard $(RUNDIR)/summary.json) | $(VENV)/.installed
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
KERNEL_OPTIONS = $(if $(filter override environment,$(origin PRESET)),--preset "$$PRESET") \
	$(if $(EPOCHS),--epochs "$$EPOCHS") $(if $(MAX_TIME),--max-time "$$MAX_TIME") \
	$(if $(DEVICE),--device "$$DEVICE") $(if $(SEED),--seed "$$SEED") \
	$(if $(filter 1,$(GPU)),--gpu) $(if $(filter 1,$(CONTINUE)),--continue) \
	$(if $(KAGGLE_KERNEL_ID),--id "$$KAGGLE_KERNEL_ID") $(if $(FORCE_GIVEN),--force)

kernel: | $(VENV)/.kernel-installed ## build the Kaggle notebook into build/kernel/ (PRESET EPOCHS MAX_TIME DEVICE SEED, GPU=1, CONTINUE=1, KAGGLE_KERNEL_ID, FORCE=1)
	$(PY) -m pipeline.kernel generate $(KERNEL_OPTIONS)

# kernel-push uploads the build as it is; with no build yet, it makes one first, from the variables given.
$(KERNEL): | $(VENV)/.kernel-installed
	$(PY) -m pipeline.kernel generate $(KERNEL_OPTIONS)

kernel-push: | $(KERNEL) $(VENV)/.kernel-installed ## push build/kernel/ to Kaggle and wait until its run completes or fails
	$(PY) -m pipeline.kernel push

kernel-output: $(KERNEL_SUBMISSION) ## download the kernel's submission.csv (and log) into submissions/kernel/

# The kernel's output lives on Kaggle and changes with every run: always ask.
$(KERNEL_SUBMISSION): FORCE | $(VENV)/.installed
	$(PY) -m pipeline.kernel output

FORCE:

PREPARE_LOCK := $(dir $(PROCESSED)).$(notdir $(PROCESSED)).lock
CLEANED := $(PROCESSED)/* runs/*/ $(SUBMISSION) submissions/.run submissions/.submission.json submissions/score.json \
  data/.kaggle-download-*
clean: ## remove processed data, runs, the submission and its records, and temp files a killed stage left (keeps data/raw, data/external, .venv, build/, submissions/kernel/ and the upload record)
	@# a run in use (its .lock held: a training, a blend, a prediction) or a prepare under way is not pulled from
	@# under its process: each lock is taken, noted as clean's, and held until everything is removed (a run's stage
	@# that locks meanwhile is refused, naming clean; a prepare waits for it)
	@if command -v flock >/dev/null; then fd=9; for lock in runs/*/.lock $(PREPARE_LOCK); do \
	  [ -e "$$lock" ] || continue; fd=$$((fd + 1)); what=$${lock%/.lock}; [ "$$lock" != $(PREPARE_LOCK) ] || what=$(PROCESSED); \
	  eval "exec $$fd<\"\$$lock\"" || { echo "error: cannot read $$lock, so $$what may be in use: check, then remove it" >&2; exit 2; }; \
	  flock -n "$$fd" || { echo "error: $$what is in use ($$(cat "$$lock")): stop it first" >&2; exit 2; }; \
	  { echo "pid $$$$ (make clean, since $$(date '+%Y-%m-%d %H:%M:%S'))" > "$$lock"; } 2>/dev/null || true; done; fi; \
	echo 'rm -rf $(CLEANED)'; rm -rf $(CLEANED)
	find $(PROCESSED) $(RAW) data/external submissions -maxdepth 1 -name '.*.tmp' -type f -delete 2>/dev/null; true
