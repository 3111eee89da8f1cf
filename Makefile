# anomaly_rl — every command a user needs. `make install` first (idempotent), then `make train` / `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install train test test-full lint sweep adapt bench clean

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

# The schema x reward ablation in the adaptation setting (experiments/adapt/README.md): per schema one
# Hydra multirun over reward x seed, each from that schema's own base (adfm: the committed warm start;
# r1, direct: experiments/adapt/bases/, made by experiments/adapt/make_bases.sh), so every cell starts
# schema-valid. Then the group-diversity probe and the aggregation (which list failed jobs); the target
# exits with the first failure's status. SWEEP_DIR=... names the folder (one sub-folder per schema).
sweep: install  ## the paper's ablation: schema x reward x 3 seeds, adapting to the unseen look -> experiments/ablation/RESULTS.md
	dir=$${SWEEP_DIR:-$${ANOMALY_RL_ROOT:-.}/logs/ablation/multiruns/$$(date +%Y-%m-%d_%H-%M-%S)}; status=0; runs=""; \
	for schema in adfm r1 direct; do \
	  if [ $$schema = adfm ]; then base=experiments/warm_start/tiny_sft; else base=experiments/adapt/bases/$$schema; fi; \
	  $(PY) -m anomaly_rl.train -m +experiment=adapt_ablation schema=$$schema init_from=$$base reward=adfm,binary \
	    seed=0,1,2 hydra.sweep.dir=$$dir/$$schema $(ARGS) || { rc=$$?; [ $$status -ne 0 ] || status=$$rc; }; \
	  runs="$$runs --runs $$dir/$$schema"; \
	done; \
	$(PY) experiments/adapt/group_diversity.py $$runs || { rc=$$?; [ $$status -ne 0 ] || status=$$rc; }; \
	$(PY) experiments/ablation/aggregate.py $$runs || { rc=$$?; [ $$status -ne 0 ] || status=$$rc; }; \
	exit $$status

adapt: install  ## the adaptation benchmark: base -> unseen look from k = 4 / 16 shots; SFT vs GRPO, 3 seeds -> experiments/adapt/RESULTS.md
	$(PY) experiments/adapt/run_adapt.py --pick-lr $(ARGS)

bench: install  ## reward scoring, rollout and GRPO-step throughput (ours against TRL's GRPOTrainer)
	$(PIP) install --quiet trl==1.16.0
	$(PY) experiments/bench/reward_speed.py
	$(PY) experiments/bench/rollout_speed.py
	$(PY) experiments/bench/grpo_throughput.py --image-size 112 $(ARGS)
	$(PY) experiments/bench/grpo_throughput.py --image-size 224 $(ARGS)

clean:
	rm -rf logs .cache data/synthetic .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
