# distill: the two commands a new user needs are `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTHON ?= python3
ARGS   ?=

.PHONY: setup run run-vl test lint bench science clean

setup: $(VENV)/.installed

# Idempotent: re-installs only when the project's metadata or pins change.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

run: setup
	$(PY) -m distill.pipeline $(ARGS)

run-vl: setup  # the VL-MoE pipeline (README, "Vision-language MoE")
	$(PY) -m distill.pipeline task=vl $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check distill teachers students tests

bench: setup
	$(PY) -m distill.bench $(ARGS)

# The DeepSpeed-MoE paper's claims, 3 seeds (conf/sweep/paper_claims.yaml): one job per seed, on the local
# submitit launcher by default (the seeds at once, one torch thread each: about an hour on 2 CPU cores);
# LAUNCHER=submitit_slurm submits them to a SLURM cluster (more launcher keys through ARGS).
LAUNCHER ?= submitit_local
science: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m distill.pipeline -m +sweep=paper_claims \
		hydra/launcher=$(LAUNCHER) hydra.launcher.timeout_min=300 $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
