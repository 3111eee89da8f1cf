# anomaly_rl — every command a user needs. `make install` first (idempotent), then `make train` / `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install train test test-full lint sweep bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

train: install  ## the embedded default: synthetic data, tiny model, SFT warm start, GRPO, before/after evaluation
	$(PY) -m anomaly_rl.train $(ARGS)

test: install  ## the default suite (slow tests excluded)
	$(PY) -m pytest -q $(ARGS)

test-full: install  ## every test, the slow ones too
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

lint: install
	$(VENV)/bin/ruff check .

# The sweep folder is named here, so the aggregation reads this sweep's runs and no older one; a failed
# job fails the multirun at its end, yet the aggregation still runs (it lists the failures), then the
# target exits with the multirun's status. SWEEP_DIR=... picks the folder.
sweep: install  ## the paper's ablation on the synthetic benchmark: schema x reward x 3 seeds -> experiments/ablation/RESULTS.md
	dir=$${SWEEP_DIR:-$${ANOMALY_RL_ROOT:-.}/logs/ablation/multiruns/$$(date +%Y-%m-%d_%H-%M-%S)}; \
	$(PY) -m anomaly_rl.train -m +experiment=ablation schema=adfm,r1,direct reward=adfm,binary seed=0,1,2 \
	  hydra.sweep.dir=$$dir $(ARGS); status=$$?; \
	$(PY) experiments/ablation/aggregate.py --runs $$dir || status=$$?; \
	exit $$status

bench: install  ## reward scoring, rollout and GRPO-step throughput (ours against TRL's GRPOTrainer)
	$(PIP) install --quiet trl==1.16.0
	$(PY) experiments/bench/reward_speed.py
	$(PY) experiments/bench/rollout_speed.py
	$(PY) experiments/bench/grpo_throughput.py --image-size 112 $(ARGS)
	$(PY) experiments/bench/grpo_throughput.py --image-size 224 $(ARGS)

clean:
	rm -rf logs .cache data/synthetic .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
