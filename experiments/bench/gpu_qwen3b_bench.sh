#!/usr/bin/env bash
# GRPO step throughput on the real Qwen2.5-VL-3B architecture, ours vs TRL 1.16, on one GPU.
#
# Random weights built on the GPU from the 3B config written in grpo_throughput.py (no download),
# bf16, conf/model/qwen2_5_vl_3b.yaml's LoRA (r 64, all linear layers of the LM, vision frozen) and
# gradient checkpointing, G=6, B=2 prompts, every response forced to 512 tokens, 448 px images
# (256 image tokens), beta 0.04, mu 1. Records step time, completions/s, tokens/s and peak GPU
# memory for both sides. Expected to take about 3-5 minutes on an H100 (see README.md).
#
# Two stages:
#   1. Here, on a machine with PyPI (once per checkout):
#        echo /.whl/ >> .git/info/exclude          # the wheels must not be committed
#        bash experiments/bench/gpu_qwen3b_bench.sh fetch
#      downloads the packages the GPU image lacks (trl, datasets, dill, multiprocess, hydra-core,
#      omegaconf, antlr4) or may have at another version (transformers, peft, fsspec: datasets caps
#      it), at the versions of .venv, into .whl/ (17 MB), plus datasets 4.8.5 into .whl/fallback/.
#      Not carried, on purpose: huggingface_hub, tokenizers, accelerate, pyarrow, pandas.
#      The image's huggingface_hub 1.33 / tokenizers 0.23.2 / accelerate 1.15 satisfy transformers
#      5.24, datasets and trl; .venv's huggingface_hub 2.x would drag in httpx2/httpcore2 and break
#      the image's tokenizers (<2.0), and pyarrow's ~40 MB wheel does not fit the 64 MiB transfer.
#   2. On the device machine (its python3 holds a CUDA torch; nothing can be fetched there):
#        device run: command "bash experiments/bench/gpu_qwen3b_bench.sh run", carry [".whl"],
#                    timeout_s 360 (expected 3-4 min; the rest of a 15 min lease allows one rerun)
#      The JSON and the log land in $OUT (or experiments/bench/results/ without $OUT); copy the
#      JSON into experiments/bench/results/. The JSON is rewritten after each side, so a TRL
#      failure or a timeout during TRL still leaves our side's numbers.
#   3. Or, instead of 2, the GPU-readiness session (experiments/bench/gpu_step.py: log-prob memory, eager vs
#      static/CUDA-graph rollout, GRPO steps of ours_static, ours and TRL; about 8-9 min on an H200):
#        device run: command "bash experiments/bench/gpu_qwen3b_bench.sh step", carry [".whl"],
#                    timeout_s 600; results in $OUT/gpu_step.json (+ one JSON per stage, the log)
#
# Overridable: STEPS (2), WARMUP (1), GROUP (6), PROMPTS (2), TOKENS (512), IMAGE_SIZE (448),
# SIDES (ours,trl), EXTRA_WHEELS (more name==version to fetch), DEVICE (cuda) and EXTRA_ARGS (more
# grpo_throughput.py options). A CPU dry run of this stage (python3 must hold torch; the py312
# multiprocess wheel needs the PIP_ settings on another Python):
#   PIP_PYTHON_VERSION=3.12 PIP_ONLY_BINARY=:all: OUT=/tmp/out DEVICE=cpu EXTRA_ARGS="--shrink --threads 1" \
#   TOKENS=8 GROUP=2 PROMPTS=1 IMAGE_SIZE=112 STEPS=1 WARMUP=0 bash experiments/bench/gpu_qwen3b_bench.sh run
set -euo pipefail
cd "$(dirname "$0")/../.."

# datasets 5.x needs pyarrow >= 24; the image's pyarrow version is not recorded. 4.8.5 is the
# newest datasets that TRL 1.16 accepts (>= 4.7) with pyarrow >= 21 and huggingface_hub < 2.
FALLBACK_DATASETS="datasets==4.8.5"
MIN_PYARROW_FOR_DATASETS5=24

fetch() {
    local py=.venv/bin/python
    local names=(trl datasets dill multiprocess fsspec hydra-core omegaconf transformers peft)
    local pins=()
    for name in "${names[@]}"; do
        pins+=("$name==$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
    done
    # shellcheck disable=SC2206
    pins+=(${EXTRA_WHEELS:-})
    local platform=(--only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    rm -rf .whl
    mkdir -p .whl/fallback
    "$py" -m pip download --no-deps "${platform[@]}" -d .whl "${pins[@]}"
    "$py" -m pip download --no-deps "${platform[@]}" -d .whl/fallback "$FALLBACK_DATASETS"
    # omegaconf's parser runtime is published as a source archive only: build its (pure-Python) wheel.
    "$py" -m pip wheel --no-deps -w .whl "antlr4-python3-runtime==$("$py" -c \
        "import importlib.metadata as m; print(m.version('antlr4-python3-runtime'))")"
    du -sh .whl
    ls -R .whl
}

versions() {
    python3 - <<'PY'
import importlib.metadata as m
import sys

import torch

print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
names = ["transformers", "trl", "datasets", "peft", "accelerate", "huggingface_hub", "tokenizers",
         "safetensors", "lightning", "torchmetrics", "hydra-core", "omegaconf", "pyarrow", "fsspec",
         "pandas", "numpy", "dill", "multiprocess"]
found = []
for name in names:
    try:
        found.append(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        found.append(f"{name} MISSING")
print(" | ".join(found))
import hydra, lightning, omegaconf, peft, transformers  # noqa: E401,F401 - our side needs these: fail early
print("our side's imports ok")
try:  # the TRL side's chain; a failure here must not stop our side from being measured
    from trl import GRPOTrainer  # noqa: F401
    import datasets  # noqa: F401
    print("TRL side's imports ok")
except Exception:
    import traceback
    traceback.print_exc()
    print("TRL side's imports FAILED: its side will be recorded as an error")
PY
}

run() {
    local out="${OUT:-experiments/bench/results}"
    mkdir -p "$out"
    # Everything, pip and the version check included, goes to the log; pipefail keeps the status.
    run_logged "$out" 2>&1 | tee "$out/gpu_qwen3b_bench.log"
}

setup_env() {
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline \
        WANDB_DISABLED=true TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
        PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    if compgen -G ".whl/*.whl" >/dev/null; then
        local wheels=(.whl/*.whl)
        local pyarrow_major
        pyarrow_major=$(python3 -c "import pyarrow; print(pyarrow.__version__.split('.')[0])" 2>/dev/null || echo 0)
        if ((pyarrow_major < MIN_PYARROW_FOR_DATASETS5)) && compgen -G ".whl/fallback/datasets-*.whl" >/dev/null; then
            echo "pyarrow major $pyarrow_major < $MIN_PYARROW_FOR_DATASETS5: installing $FALLBACK_DATASETS instead"
            wheels=()
            for w in .whl/*.whl; do [[ $(basename "$w") == datasets-* ]] || wheels+=("$w"); done
            wheels+=(.whl/fallback/datasets-*.whl)
        fi
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "${wheels[@]}"
        export PYTHONPATH="/tmp/site:$PWD"
    else
        echo "no .whl/ folder: run '$0 fetch' here first and carry .whl" >&2
        export PYTHONPATH="$PWD"
    fi
    versions
}

run_logged() {
    local out=$1 started=$SECONDS status=0
    setup_env
    echo "setup took $((SECONDS - started)) s"
    # shellcheck disable=SC2086
    python3 experiments/bench/grpo_throughput.py --arch qwen2_5_vl_3b --device "${DEVICE:-cuda}" \
        --group "${GROUP:-6}" --prompts "${PROMPTS:-2}" --tokens "${TOKENS:-512}" \
        --image-size "${IMAGE_SIZE:-448}" --steps "${STEPS:-2}" --warmup "${WARMUP:-1}" \
        --sides "${SIDES:-ours,trl}" --cache-dir /tmp/tiny_models ${EXTRA_ARGS:-} \
        --out "$out/grpo_qwen2_5_vl_3b_gpu.json" || status=$?
    nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader || true
    echo "run stage took $((SECONDS - started)) s"
    return $status
}

# The GPU-readiness session (experiments/bench/gpu_step.py): log-prob head memory, eager vs static
# (CUDA graph) rollout, then GRPO steps of ours_static, ours (eager) and TRL, one JSON in $OUT.
step() {
    local out="${OUT:-experiments/bench/results/gpu_step}"
    mkdir -p "$out"
    step_logged "$out" 2>&1 | tee "$out/gpu_step.log"
}

step_logged() {
    local out=$1 started=$SECONDS status=0
    setup_env
    echo "setup took $((SECONDS - started)) s"
    # shellcheck disable=SC2086
    python3 experiments/bench/gpu_step.py --out-dir "$out" ${EXTRA_ARGS:-} || status=$?
    nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader || true
    echo "step stage took $((SECONDS - started)) s"
    return $status
}

case "${1:-}" in
    fetch) fetch ;;
    run) run ;;
    step) step ;;
    *) echo "usage: $0 fetch|run|step   (see the header of this file)" >&2; exit 2 ;;
esac
