# The README's two commands: `make run` (set up, score the baselines on the quick task and
# build the leaderboard)
# and `make test` (set up, run the whole test suite). Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
TASK ?= classic-transfer-v1-quick
# The drift and td_loss baselines, their best-known discovered rules and the drift control;
# `make run-all` scores every folder in submissions/baselines (all families, all controls).
MAIN_BASELINES ?= ppo_clip dpo dqn dqn_reg null_drift

.PHONY: run run-all test setup bench clean mutants

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints/tested-py311.txt
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "the tested set is for Python 3.11, found " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints/tested-py311.txt -e ".[test]"
	touch $@

# Scored under metabench's numerics defaults (records name the settings that change numbers).
NUMERICS_DEFAULTS := env -u XLA_FLAGS -u JAX_ENABLE_X64 -u JAX_DEFAULT_MATMUL_PRECISION

run: setup
	$(NUMERICS_DEFAULTS) $(BIN)/metabench submit $(addprefix submissions/baselines/,$(MAIN_BASELINES)) --task $(TASK) --force
	$(BIN)/metabench leaderboard build

run-all: setup
	$(NUMERICS_DEFAULTS) $(BIN)/metabench submit submissions/baselines/* --task $(TASK) --force
	$(NUMERICS_DEFAULTS) $(BIN)/metabench submit submissions/baselines/* --task $(TASK) --split train --force
	$(BIN)/metabench leaderboard build

# Two workers, one test file each at a time (module fixtures and compiled functions stay
# shared): XLA compiles on one thread, so two files overlap well even on 2 cores.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: setup
	$(BIN)/metabench bench

clean:
	rm -rf $(VENV) runs

# Planted bugs (tools/mutants/*.yaml), one at a time in a scratch copy: every one must be
# killed by the tests it names. Slower than `make test`, so not part of it.
mutants: setup
	$(BIN)/python tools/mutants/run.py
