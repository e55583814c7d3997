# captioner — common tasks. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# torch and torchvision are installed first and pinned as a pair: torch==2.14.1 + torchvision==0.29.1 is the pair
# served offline on our build machines and CI, and timm needs a torchvision built for the same torch (the CPU
# wheel torch 2.13.0 found there cannot import timm: "operator torchvision::nms does not exist").
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev,cluster,demo]'
	touch $@

install: $(VENV)/.installed ## create .venv and install the suite with dev + cluster (submitit launcher) + demo (Gradio) extras

test: $(VENV)/.installed ## run the test suite (offline, CPU; slow tests excluded)
	$(PY) -m pytest -q --durations=15

test-fast: $(VENV)/.installed ## unit tests only (not e2e: no CLI or training runs; tests/conftest.py E2E_FILES), < 2 min
	$(PY) -m pytest -q -m 'not slow and not e2e'

test-all: $(VENV)/.installed ## run every test, slow ones included
	$(PY) -m pytest -q -m ''

inspect: $(VENV)/.installed ## dataset statistics for the default dataset (data=shapes)
	$(PY) -m captioner.inspect

prepare: $(VENV)/.installed ## generate the shapes world and cache its EfficientNet-Lite0 features
	$(PY) -m captioner.prepare data=shapes encoder=efficientnet_lite0

train: $(VENV)/.installed ## train + test one captioner offline (experiment=shapes_offline, model=dino_lstm_init)
	$(PY) train.py

sweep: $(VENV)/.installed ## train + test every variant offline in one Hydra multirun
	$(PY) train.py -m model=$(VARIANTS)

# The variants in their numbered order, read from conf/model/*.yaml (`model.variant`), where they are listed once.
MODEL_NUMBERS = grep -H '^  variant:' conf/model/*.yaml | sed 's|conf/model/||; s|\.yaml:  variant:||' | awk '{print $$2, $$1}'
VARIANTS = $(shell $(MODEL_NUMBERS) | sort -n | cut -d' ' -f2 | paste -sd, -)

# The demo runs two jobs side by side, one thread each (hydra/launcher=parallel), longest (highest-numbered)
# first: on 2 cores that beats one two-thread job after the other (the transformer gains only 1.16x from a
# second thread).
DEMO_ORDER = $(shell $(MODEL_NUMBERS) | sort -rn | cut -d' ' -f2 | paste -sd, -)

demo: $(VENV)/.installed ## offline sweep of every variant (one seed) + its comparison report, in multirun/demo-<time>/
	@d=multirun/demo-$$(date +%Y-%m-%d_%H-%M-%S); start=$$(date +%s); \
	$(PY) train.py -m hydra/launcher=parallel model=$(DEMO_ORDER) hydra.sweep.dir=$$d && \
	echo "sweep wall time: $$(( $$(date +%s) - start )) s" | tee $$d/sweep_seconds.txt && \
	$(PY) experiments/compare.py $$d

# The learning rates every variant is trained at in `make search`, each then chosen on validation BLEU-4.
LR_GRID ?= 1e-4,3e-4,1e-3,3e-3

search: $(VENV)/.installed ## every variant at each LR_GRID rate (seed 0), chosen by validation BLEU-4 -> <sweep>/lr_search.md
	@d=multirun/search-$$(date +%Y-%m-%d_%H-%M-%S); start=$$(date +%s); \
	$(PY) train.py -m hydra/launcher=parallel model=$(DEMO_ORDER) optimizer.lr=$(LR_GRID) seed=0 \
		hydra.sweep.dir=$$d && \
	echo "search wall time: $$(( $$(date +%s) - start )) s" | tee $$d/sweep_seconds.txt && \
	$(PY) experiments/lr_search.py $$d

# The seeds of `make study`; the search ran on seed 0, so no study run repeats a search run.
SEEDS ?= 1,2,3

study: $(VENV)/.installed ## every variant x SEEDS (3) offline + the multi-seed report, in multirun/study-<time>/ (2 CPU cores)
	@d=multirun/study-$$(date +%Y-%m-%d_%H-%M-%S); start=$$(date +%s); \
	$(PY) train.py -m hydra/launcher=parallel model=$(DEMO_ORDER) seed=$(SEEDS) hydra.sweep.dir=$$d && \
	echo "sweep wall time: $$(( $$(date +%s) - start )) s" | tee $$d/sweep_seconds.txt && \
	$(PY) experiments/compare.py $$d

# The study whose cross-entropy runs `make scst-study` fine-tunes (default: the newest `make study`).
STUDY ?= $(shell ls -td multirun/study-* 2>/dev/null | head -n 1)
SCST_EPOCHS ?= 2

scst-study: $(VENV)/.installed ## SCST on dino_lstm_init + dino_attention from STUDY's runs, paired vs cross-entropy -> <study>/scst/
	@if [ -z "$(STUDY)" ]; then echo "error: no multirun/study-* found: run 'make study' first, or name one:" \
		"make scst-study STUDY=path/to/study" >&2; exit 1; fi
	$(PY) experiments/scst_study.py "$(STUDY)" --epochs $(SCST_EPOCHS)

BATCH ?= 256
RULE ?= sqrt

batch-study: $(VENV)/.installed ## a large batch (BATCH, lr by RULE) vs STUDY's batch-64 runs of dino_lstm_init + dino_attention -> <study>/batch-*/
	@if [ -z "$(STUDY)" ]; then echo "error: no multirun/study-* found: run 'make study' first, or name one:" \
		"make batch-study STUDY=path/to/study" >&2; exit 1; fi
	$(PY) experiments/batch_scaling.py "$(STUDY)" --batch-size $(BATCH) --rule $(RULE)

bench: $(VENV)/.installed ## the benchmark: every speed/memory figure beside its goal -> benchmark.json
	$(PY) experiments/benchmark.py

# The newest sweep by its multirun.yaml, which Hydra writes once when a sweep starts: writing a report into an older
# sweep later touches that sweep's directory, but must not make it the "newest".
SWEEP ?= $(shell ls -t multirun/*/multirun.yaml 2>/dev/null | head -n 1 | xargs -r dirname)

report: $(VENV)/.installed ## comparison report of a sweep into <sweep>/report/ (SWEEP=multirun/<dir>; default: newest)
	@if [ -z "$(SWEEP)" ]; then echo "error: no sweep found under multirun/ (no multirun/*/multirun.yaml): run" \
		"'make sweep' first, or name one: make report SWEEP=path/to/sweep" >&2; exit 1; fi
	$(PY) experiments/compare.py "$(SWEEP)"

clean: ## remove generated data, caches and run outputs (keeps .venv)
	rm -rf data/cache data/shapes outputs multirun

.PHONY: help install test test-fast test-all inspect prepare train sweep demo search study scst-study batch-study report bench clean
