# make demo   the embedded default end to end: tables and figures under results/ (no weights, no network)
# make test   the test suite, including the whole DAG on configs/test.yaml
# make lint   ruff (lint + format) and snakemake --lint
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= 2
RESULTS ?= results

.PHONY: setup demo test lint

setup:
	@EFFIVLM_VENV=$(VENV) bash scripts/setup_env.sh

demo: setup
	$(VENV)/bin/snakemake --cores $(CORES) --rerun-incomplete --config results=$(RESULTS)
	@echo
	@echo "tables:  $(RESULTS)/tables/metrics.csv  summary.csv  summary.md  efficiency.csv  pareto.csv  paper/"
	@echo "figures: $(RESULTS)/figures/retained_vs_budget  task_ratios  loyalty_heatmap  pareto_OP  pareto_OL  (.png, .svg)"
	@echo "logs:    $(RESULTS)/logs/"

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/snakemake --lint
