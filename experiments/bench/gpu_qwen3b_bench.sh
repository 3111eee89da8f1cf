#!/usr/bin/env bash
# GRPO step throughput on the real Qwen2.5-VL-3B architecture, ours vs TRL 1.16, on one GPU.
#
# Random weights built from the 3B config written in grpo_throughput.py (no download), bf16,
# conf/model/qwen2_5_vl_3b.yaml's LoRA (r 64, all linear layers of the LM, vision frozen) and
# gradient checkpointing, G=6, B=2 prompts, every response forced to 512 tokens, 448 px images
# (256 image tokens), beta 0.04, mu 1. Records step time, completions/s, tokens/s and peak GPU
# memory for both sides. Expected to take about 3-5 minutes on an H100 (see README.md).
#
# Two stages:
#   1. Here, on a machine with PyPI (once per checkout):
#        echo /.whl/ >> .git/info/exclude          # the wheels must not be committed
#        bash experiments/bench/gpu_qwen3b_bench.sh fetch
#      downloads the packages the GPU image lacks (trl, datasets, hydra) or has at another version
#      (transformers, peft), at the versions of .venv, into .whl/ (about 20 MB).
#   2. On the device machine (its python3 holds a CUDA torch; nothing can be fetched there):
#        device run: command "bash experiments/bench/gpu_qwen3b_bench.sh run", carry [".whl"],
#                    timeout_s 540
#      The JSON and the log land in $OUT (or experiments/bench/results/ without $OUT); copy the
#      JSON into experiments/bench/results/.
#
# Overridable: STEPS (2), WARMUP (1), GROUP (6), PROMPTS (2), TOKENS (512), IMAGE_SIZE (448),
# SIDES (ours,trl), EXTRA_WHEELS (more name==version to fetch, e.g. pyarrow==26.0.1 if the image's
# pyarrow is too old for datasets).
set -euo pipefail
cd "$(dirname "$0")/../.."

fetch() {
    local py=.venv/bin/python
    local names=(trl datasets dill multiprocess hydra-core omegaconf transformers peft)
    local pins=()
    for name in "${names[@]}"; do
        pins+=("$name==$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
    done
    # shellcheck disable=SC2206
    pins+=(${EXTRA_WHEELS:-})
    mkdir -p .whl
    "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${pins[@]}"
    # omegaconf's parser runtime is published as a source archive only: build its (pure-Python) wheel.
    "$py" -m pip wheel --no-deps -w .whl "antlr4-python3-runtime==$("$py" -c \
        "import importlib.metadata as m; print(m.version('antlr4-python3-runtime'))")"
    du -sh .whl
    ls .whl
}

run() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PWD"
    else
        echo "no .whl/ folder: run '$0 fetch' here first and carry .whl" >&2
        export PYTHONPATH="$PWD"
    fi
    export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    local out="${OUT:-experiments/bench/results}"
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import torch, transformers, trl, datasets, peft, lightning, hydra; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, \
'| trl', trl.__version__, '| datasets', datasets.__version__, '| peft', peft.__version__, \
'| lightning', lightning.__version__)"
    python3 experiments/bench/grpo_throughput.py --arch qwen2_5_vl_3b --device cuda \
        --group "${GROUP:-6}" --prompts "${PROMPTS:-2}" --tokens "${TOKENS:-512}" \
        --image-size "${IMAGE_SIZE:-448}" --steps "${STEPS:-2}" --warmup "${WARMUP:-1}" \
        --sides "${SIDES:-ours,trl}" --cache-dir /tmp/tiny_models \
        --out "$out/grpo_qwen2_5_vl_3b_gpu.json" 2>&1 | tee "$out/gpu_qwen3b_bench.log"
}

case "${1:-}" in
    fetch) fetch ;;
    run) run ;;
    *) echo "usage: $0 fetch|run   (see the header of this file)" >&2; exit 2 ;;
esac
