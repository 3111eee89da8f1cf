#!/usr/bin/env bash
# Reproduce the committed SFT warm start of the embedded default (experiments/warm_start/tiny_sft/):
# the `warm_start` recipe of conf/train.yaml on the synthetic training split, then copy its weights here.
# About 20-25 minutes on 2 CPU cores. Usage: bash experiments/warm_start/make_warm_start.sh [overrides...]
set -euo pipefail
cd "$(dirname "$0")/../.."
export WANDB_MODE=offline HF_HUB_OFFLINE=1
run_dir="logs/warm_start/runs/make_warm_start_$(date +%Y-%m-%d_%H-%M-%S)"
.venv/bin/python -m anomaly_rl.train +experiment=warm_start logger=csv "hydra.run.dir=${run_dir}" "$@"
rm -rf experiments/warm_start/tiny_sft
mkdir -p experiments/warm_start/tiny_sft
cp "${run_dir}/final/weights.pt" "${run_dir}/final/meta.json" experiments/warm_start/tiny_sft/
cp "${run_dir}/config.yaml" experiments/warm_start/tiny_sft/train_config.yaml
cp "${run_dir}/eval_sft/metrics.md" experiments/warm_start/tiny_sft/test_metrics.md
echo "warm start written to experiments/warm_start/tiny_sft (from ${run_dir})"
