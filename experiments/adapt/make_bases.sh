#!/usr/bin/env bash
# Reproduce the per-schema bases of the adaptation ablation (experiments/adapt/bases/<schema>/).
# Each base is the committed warm start (experiments/warm_start/tiny_sft: 2,000 SFT steps in the
# adfm format on metal, fabric and pill) fine-tuned for BASE_STEPS more SFT steps at a constant
# 1e-4 (the warm start's own stage-2 recipe) on the same old looks, in the schema's own format — so
# every schema starts from the same knowledge, answers in its own format, and has had the same
# extra training (adfm included). The unseen look (screw) is never shown to a base.
# Usage: bash experiments/adapt/make_bases.sh [adfm r1 direct]   (env BASE_STEPS, default 300;
# the schemas run one after another unless PARALLEL=1, two at a time with one thread each)
set -euo pipefail
cd "$(dirname "$0")/../.."
export WANDB_MODE=offline HF_HUB_OFFLINE=1
steps="${BASE_STEPS:-300}"
schemas=("$@"); [ ${#schemas[@]} -eq 0 ] && schemas=(adfm r1 direct)
stamp="$(date +%Y-%m-%d_%H-%M-%S)"
one() {
  local schema="$1" run="logs/adapt/bases/${stamp}_$1"
  .venv/bin/python -m anomaly_rl.train +experiment=warm_start logger=csv callbacks=none "hydra.run.dir=${run}" \
    "schema=${schema}" init_from=experiments/warm_start/tiny_sft "warm_start.max_steps=${steps}" \
    warm_start.warmup_steps=0 warm_start.lr_schedule=constant warm_start.optimizer.lr=1.0e-4 seed=0 \
    > "logs/adapt/bases/${stamp}_${schema}.log" 2>&1
  # fp16 on disk (11 MB instead of 21 MB); loading casts back to the model's float32.
  .venv/bin/python experiments/adapt/pack_base.py "${run}" "experiments/adapt/bases/${schema}"
}
mkdir -p logs/adapt/bases
if [ "${PARALLEL:-0}" = 1 ]; then
  export OMP_NUM_THREADS=1
  pids=()
  for s in "${schemas[@]}"; do one "$s" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
else
  for s in "${schemas[@]}"; do one "$s"; done
fi
echo "bases written to experiments/adapt/bases/{${schemas[*]}}"
