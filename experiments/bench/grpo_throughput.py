"""GRPO step throughput: our GRPOModule.training_step against TRL 1.16's GRPOTrainer, same work.

    .venv/bin/python experiments/bench/grpo_throughput.py [--image-size 112] [--group 8] [--prompts 2]
        [--tokens 32] [--steps 5] [--warmup 1] [--threads N] [--sides ours,trl] [--out FILE]
    # the real Qwen2.5-VL-3B architecture, random weights, on a GPU (see gpu_qwen3b_bench.sh):
    python3 experiments/bench/grpo_throughput.py --arch qwen2_5_vl_3b --group 6 --tokens 512

Both sides get the same model weights (each side loads or builds its own copy from the same
source, checked by a weight fingerprint), the same processor, images and chat prompts, G, B, L,
temperature 0.9, top_p 1, no top-k, the same never-sampled tokens, beta > 0, mu = 1, one mini-batch,
AdamW(lr 1e-5, weight decay 0) and gradient clipping at 1.0. Every completion is forced to exactly
L tokens so that both do the same decoding and scoring work: ours runs the sampler with no stop
tokens (the stop tokens join the never-sampled ones), TRL gets `min_new_tokens=L`, which masks the
stop tokens until L. The reward is a cheap deterministic function of the response text, the same on
both sides. The forced lengths are checked after the run, not assumed.

Timed: one optimiser step = one generated batch of B prompts x G completions and its update,
from Lightning's on_train_batch_start to on_train_batch_end (ours) and from the HF Trainer's
on_step_begin to on_step_end (TRL); both exclude fetching the batch of records, both include the
processor, vision tower, sampling, reward, reference and policy log-probs, backward and the
optimiser step. `--warmup` steps are run and dropped, then `--steps` are timed; the median is
reported. The JSON under experiments/bench/results/ records the machine, the command and the load
average (a CPU measurement taken while the 1-minute load average is >= 1.0 is marked contended).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from anomaly_rl.data.datamodule import PromptBatch
from anomaly_rl.data.records import Sample
from anomaly_rl.data.synthetic import CATEGORIES, SyntheticConfig, render
from anomaly_rl.grpo.module import GRPOModule
from anomaly_rl.models.loading import apply_finetuning, load_model_and_processor, resolve_model_dir
from anomaly_rl.models.processing import never_sampled_token_ids, stop_token_ids, unwrap_model
from anomaly_rl.models.processor import ImageOnlyQwenVLProcessor, fixed_size_image_processor
from anomaly_rl.rollout.backends import make_rollout_backend
from anomaly_rl.rollout.logprobs import make_reference, needs_reference_copy, reference_context
from anomaly_rl.schemas.base import Schema
from anomaly_rl.schemas.config import load_schema
from anomaly_rl.schemas.parsed import ParsedResponse
from anomaly_rl.training.batches import ResumableBatches
from anomaly_rl.training.prompts import frame_of

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "experiments" / "bench" / "results"
LEARNING_RATE = 1e-5
TEMPERATURE = 0.9
CONTENDED_LOAD = 1.0

# Qwen2.5-VL-3B-Instruct's published architecture (config.json of the Hugging Face checkpoint),
# written out so that the benchmark needs no download: random weights cost the same as real ones.
QWEN2_5_VL_3B_TEXT: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
QWEN2_5_VL_3B_VISION: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "out_hidden_size": 2048,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
}


# Our sides and the rollout backend each runs (anomaly_rl.rollout.backends, `algo.rollout_backend`).
OUR_SIDES: dict[str, str] = {"ours": "eager", "ours_static": "static"}


class BenchSetupError(ValueError):
    """Command-line settings that cannot give a fair comparison."""


def grpo_settings(**values: Any) -> Any:
    """GRPOSettings for the benchmark: conf/algo/grpo.yaml (the paper's values) with `values`,
    AdamW(lr 1e-5, no decay) and no dynamic sampling on top."""
    import hydra

    def adamw(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)

    settings = hydra.utils.instantiate(OmegaConf.load(ROOT / "conf" / "algo" / "grpo.yaml"))
    names = {f.name for f in dataclasses.fields(settings)}
    values = {**values, "optimizer": adamw, "dynamic_sampling": dataclasses.replace(settings.dynamic_sampling, enabled=False)}
    return dataclasses.replace(settings, **{k: v for k, v in values.items() if k in names})


# --------------------------------------------------------------------------- models


@dataclass
class Built:
    model: torch.nn.Module
    processor: ImageOnlyQwenVLProcessor
    gradient_checkpointing: bool


def tiny_model_cfg(args: argparse.Namespace) -> dict[str, Any]:
    """conf/model/tiny.yaml with the cache folder, image size and fine-tuning mode of this run."""
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")
    cfg.cache_dir = str(ROOT / args.cache_dir)  # relative to the repository root; an absolute path stays
    cfg.tiny.image_size = args.image_size
    cfg.dtype = "float32"  # CPU default; bf16 CPU matmuls are slow and TRL needs bf16=False on CPU
    if args.finetune:
        cfg.finetune = args.finetune
    return OmegaConf.to_container(cfg, resolve=True)


def build_tiny(args: argparse.Namespace, device: torch.device) -> Built:
    """Loaded from the tiny model's cache folder: every call gives bit-identical weights."""
    model, processor = load_model_and_processor(tiny_model_cfg(args))
    return Built(model.to(device), processor, gradient_checkpointing=False)


def qwen3b_processor(args: argparse.Namespace) -> ImageOnlyQwenVLProcessor:
    """The tiny tokenizer with a Qwen2.5-VL image processor (patch 14, merge 2) at --image-size.

    The tiny tokenizer's ids all lie below the 3B vocabulary; the ids above it are never sampled
    (never_sampled_token_ids covers everything past len(tokenizer)), so no drawn token is undecodable.
    """
    cfg = tiny_model_cfg(args)
    cfg["tiny"]["image_size"] = 112  # the default tiny folder: only its tokenizer is used
    folder = resolve_model_dir(cfg)
    tiny = ImageOnlyQwenVLProcessor.from_pretrained(str(folder), local_files_only=True)
    vision = QWEN2_5_VL_3B_VISION
    image_processor = fixed_size_image_processor(
        args.image_size, patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"]
    )
    if len(tiny.tokenizer) > QWEN2_5_VL_3B_TEXT["vocab_size"]:
        raise BenchSetupError("the tiny tokenizer has more tokens than the 3B vocabulary")
    return ImageOnlyQwenVLProcessor(
        image_processor=image_processor, tokenizer=tiny.tokenizer, chat_template=tiny.chat_template
    )


def qwen3b_config(processor: ImageOnlyQwenVLProcessor, shrink: bool) -> Any:
    from transformers import Qwen2_5_VLConfig

    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids
    text = dict(QWEN2_5_VL_3B_TEXT)
    vision = dict(QWEN2_5_VL_3B_VISION)
    if shrink:  # CPU smoke test of this code path: one block each, every width as in the 3B
        text["num_hidden_layers"], vision["depth"], vision["fullatt_block_indexes"] = 1, 1, [0]
    eos = ids("<|im_end|>")
    return Qwen2_5_VLConfig(
        text_config={**text, "bos_token_id": None, "eos_token_id": eos, "pad_token_id": tok.pad_token_id},
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def build_qwen3b(args: argparse.Namespace, device: torch.device) -> Built:
    """Random Qwen2.5-VL-3B weights from a fixed seed, then conf/model/qwen2_5_vl_3b.yaml's LoRA."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "qwen2_5_vl_3b.yaml"), resolve=True)
    if args.finetune:
        cfg["finetune"] = args.finetune
    if cfg["finetune"] != "lora":
        # TRL would rebuild a full-fine-tuning reference from model.config's path, which a model
        # built from a config does not have.
        raise BenchSetupError("--arch qwen2_5_vl_3b benchmarks LoRA only (--finetune lora)")
    processor = qwen3b_processor(args)
    config = qwen3b_config(processor, args.shrink)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        with device:
            model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
        model.generation_config.eos_token_id = config.text_config.eos_token_id
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
        checkpointing = bool(cfg.get("gradient_checkpointing", False))
        if checkpointing:  # as load_model_and_processor does for a real checkpoint
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model = apply_finetuning(model, cfg)  # LoRA's own init draws from the seeded stream too
    return Built(model.to(device), processor, gradient_checkpointing=checkpointing)


def build(args: argparse.Namespace, device: torch.device) -> Built:
    return build_qwen3b(args, device) if args.arch == "qwen2_5_vl_3b" else build_tiny(args, device)


def timed_build(args: argparse.Namespace, device: torch.device, side: str) -> tuple[Built, float]:
    """The side's model and processor, and the seconds it took (not part of any timed step)."""
    start = time.perf_counter()
    built = build(args, device)
    _sync(device)
    seconds = time.perf_counter() - start
    print(f"{side}: model built in {seconds:.1f} s on {device}", flush=True)
    return built, seconds


def weight_fingerprint(model: torch.nn.Module) -> float:
    """A sum over every parameter: equal on both sides when they start from the same weights."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


# --------------------------------------------------------------------------- data and reward


def make_data(image_size: int, count: int) -> tuple[list[Sample], dict[str, Image.Image]]:
    """`count` synthetic records (normal and defective, every category) and their images in memory."""
    config = SyntheticConfig(image_size=image_size)
    samples, images = [], {}
    for i in range(count):
        category = CATEGORIES[i % len(CATEGORIES)]
        kind = "test_anomalous" if i % 2 else "train_good"
        path = f"memory://{category}/{kind}/{i}"
        images[path] = Image.fromarray(render(config, category, kind, i).image)
        label = "anomalous" if i % 2 else "normal"
        samples.append(
            Sample(path, label, category, "spot" if i % 2 else "good", None, (), (image_size, image_size), "train")
        )
    return samples, images


def text_reward(text: str) -> float:
    """Cheap, deterministic and varied across a group (so advantages are not all zero)."""
    return (sum(map(ord, text)) % 97) / 96.0


def our_reward(parsed: Sequence[ParsedResponse], samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    return {"total": np.array([text_reward(p.text) for p in parsed], dtype=np.float32)}


def trl_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """TRL passes conversational completions ([{"role": "assistant", "content": text}]) here."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [text_reward(t if isinstance(t, str) else str(t)) for t in texts]


def never_sampled(built: Built) -> list[int]:
    """Our sampler's never-sampled tokens; both sides suppress exactly these (plus stop tokens until L)."""
    vocab = unwrap_model(built.model).get_output_embeddings().weight.shape[0]
    return never_sampled_token_ids(built.processor, vocab, stop_token_ids(built.processor))


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Wall time of each step, synchronised with the GPU so that queued kernels are counted.

    Each step is printed as it ends: a device run cut off by its time limit still shows how far
    each side got and how long its steps took.
    """

    def __init__(self, device: torch.device, side: str) -> None:
        self.device = device
        self.side = side
        self.times: list[float] = []
        self._start = 0.0

    def begin(self) -> None:
        _sync(self.device)
        self._start = time.perf_counter()

    def end(self) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter() - self._start)
        print(f"{self.side} step {len(self.times)}: {self.times[-1]:.2f} s", flush=True)


class LightningClock(L.Callback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
        self.clock.begin()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self.clock.end()


def trl_clock_callback(clock: StepClock) -> Any:
    from transformers import TrainerCallback

    class TrlClock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.end()

    return TrlClock()


# --------------------------------------------------------------------------- the two sides


def run_ours(
    args: argparse.Namespace,
    device: torch.device,
    schema: Schema,
    samples: list[Sample],
    images: dict[str, Image.Image],
    workdir: Path,
    side: str = "ours",
) -> dict[str, Any]:
    """GRPOModule.training_step under a minimal Lightning Trainer: the production step, unchanged.

    `side` picks our rollout backend (OUR_SIDES): "ours" the eager loop, "ours_static" the static
    KV cache with the decode step replayed from a CUDA graph on a GPU.
    """
    built, build_s = timed_build(args, device, side)
    fingerprint = weight_fingerprint(built.model)
    model = built.model
    frozen = make_reference(model) if needs_reference_copy(model) else None
    settings = grpo_settings(
        group_size=args.group,
        prompts_per_step=args.prompts,
        temperature=TEMPERATURE,
        top_p=1.0,
        max_new_tokens=args.tokens,
        beta=args.beta,
        num_iterations=1,
        mini_batches=1,
        max_steps=args.warmup + args.steps,
        lr_schedule="constant",
        warmup_steps=0,
        logprob_chunk_size=args.logprob_chunk_size,
        log_samples_every=0,
    )

    def collate(batch: list[Sample]) -> PromptBatch:
        return PromptBatch(samples=batch, images=[images[s.image_path] for s in batch], references=[[] for _ in batch])

    batches = ResumableBatches(samples, args.prompts, args.seed, collate)
    backend = make_rollout_backend(OUR_SIDES[side])
    module = GRPOModule(
        model,
        built.processor,
        schema,
        our_reward,
        batches,
        settings,
        lambda: reference_context(model, frozen),
        rollout_backend=backend,
    )
    # Forced length: no stop token ends a response, and none is drawn (TRL's min_new_tokens masks
    # them the same way), so every row decodes exactly L tokens.
    stops = stop_token_ids(built.processor)
    module.eos_token_ids = []
    module.suppress_token_ids = sorted(set(module.suppress_token_ids) | set(stops))
    # The module makes its sampling generator on the policy's device itself (torch.multinomial needs
    # one there), seeded from the batches' seed.
    clock = StepClock(device, side)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_steps=args.warmup + args.steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[LightningClock(clock)],
        default_root_dir=str(workdir / side),
    )
    _reset_peak(device)
    trainer.fit(module)
    lengths = [(h["train/completion_length_mean"], h["train/completion_length_max"]) for h in module.history]
    forced = all(mean == args.tokens and top == args.tokens for mean, top in lengths)
    result = summarise(side, clock.times, args, device, fingerprint, forced)
    result["build_s"] = build_s
    result["rollout_backend"] = OUR_SIDES[side]
    last_run = getattr(backend, "last_run", None)
    if last_run is not None:  # the static backend says whether its decode steps ran from a CUDA graph
        result["static_last_run"] = dataclasses.asdict(last_run)
    # The module's own timers (rollout = prompts + vision + sampling; update = reference and policy
    # log-probs, backward, optimiser step): a check of the callback's numbers and a breakdown.
    for key in ("step_s", "rollout_s", "score_s", "update_s"):
        result[f"module_{key}"] = [h[f"time/{key}"] for h in module.history]
    return result


def trl_dataset(schema: Schema, samples: list[Sample], images: dict[str, Image.Image], processor: Any) -> Any:
    """TRL's VLM format: a conversational "prompt" with {"type": "image"} slots and an "image" column."""
    from datasets import Dataset

    rows = [
        {"prompt": schema.messages(s, frame_of(s, processor).model_size), "image": images[s.image_path]}
        for s in samples
    ]
    return Dataset.from_list(rows)


def check_same_prompt(dataset: Any, schema: Schema, sample: Sample, processor: Any) -> bool:
    """TRL renders the dataset row (after Arrow's round trip) to the same prompt text as we do."""
    from trl.data_utils import prepare_multimodal_messages

    row = dataset[0]
    theirs = processor.apply_chat_template(
        prepare_multimodal_messages(row["prompt"], images=[row["image"]]), add_generation_prompt=True, tokenize=False
    )
    ours = processor.apply_chat_template(
        schema.messages(sample, frame_of(sample, processor).model_size), add_generation_prompt=True, tokenize=False
    )
    return theirs == ours


def run_trl(
    args: argparse.Namespace,
    device: torch.device,
    schema: Schema,
    samples: list[Sample],
    images: dict[str, Image.Image],
    workdir: Path,
) -> dict[str, Any]:
    from trl import GRPOConfig, GRPOTrainer

    built, build_s = timed_build(args, device, "trl")
    fingerprint = weight_fingerprint(built.model)
    dataset = trl_dataset(schema, samples, images, built.processor)
    same_prompt = check_same_prompt(dataset, schema, samples[0], built.processor)
    on_gpu = device.type == "cuda"
    config = GRPOConfig(
        output_dir=str(workdir / "trl"),
        num_generations=args.group,
        per_device_train_batch_size=args.prompts * args.group,
        gradient_accumulation_steps=1,
        max_completion_length=args.tokens,
        beta=args.beta,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group",
        epsilon=0.2,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        optim="adamw_torch",
        max_grad_norm=1.0,
        max_steps=args.warmup + args.steps,
        bf16=on_gpu,
        use_cpu=not on_gpu,
        gradient_checkpointing=built.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if built.gradient_checkpointing else None,
        disable_dropout=False,  # ours keeps the configured (LoRA) dropout; so does this side
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=args.seed,
        dataloader_num_workers=0,
        generation_kwargs={"min_new_tokens": args.tokens, "suppress_tokens": never_sampled(built)},
    )
    clock = StepClock(device, "trl")
    trainer = GRPOTrainer(
        model=built.model,
        reward_funcs=[trl_reward],
        args=config,
        train_dataset=dataset,
        processing_class=built.processor,
        callbacks=[trl_clock_callback(clock)],
    )
    _reset_peak(device)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/min_length" in h]
    forced = bool(logs) and all(
        h["completions/min_length"] == args.tokens and h["completions/max_length"] == args.tokens for h in logs
    )
    result = summarise("trl", clock.times, args, device, fingerprint, forced)
    result["build_s"] = build_s
    result["same_prompt_text_as_ours"] = same_prompt
    # TRL's own per-step timer, an independent check of the callback's numbers.
    result["trl_logged_step_time_s"] = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    return result


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summarise(
    side: str,
    times: list[float],
    args: argparse.Namespace,
    device: torch.device,
    fingerprint: float,
    forced: bool,
) -> dict[str, Any]:
    timed = times[args.warmup :]
    if len(timed) != args.steps:
        raise RuntimeError(f"{side}: timed {len(times)} steps, expected {args.warmup + args.steps}")
    median = statistics.median(timed)
    completions = args.prompts * args.group
    result: dict[str, Any] = {
        "step_s": timed,
        "warmup_step_s": times[: args.warmup],
        "median_step_s": median,
        "completions_per_s": completions / median,
        "completion_tokens_per_s": completions * args.tokens / median,
        "forced_length_ok": forced,
        "weight_fingerprint": fingerprint,
        "loadavg_after": list(os.getloadavg()),
    }
    if device.type == "cuda":
        # Peak over the timed run, the side's own weights and optimiser state included.
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


# --------------------------------------------------------------------------- report


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "versions": {p: _version(p) for p in ("torch", "transformers", "trl", "lightning", "peft", "datasets")},
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _version(package: str) -> str | None:
    try:
        return version(package)
    except Exception:  # noqa: BLE001 - a missing package is reported as None, not a crash
        return None


def command_line() -> str:
    def shown(path: str) -> str:  # relative to the repository root where possible: no machine paths
        absolute = Path(path).absolute()
        return str(absolute.relative_to(ROOT)) if absolute.is_relative_to(ROOT) else Path(path).name

    return shlex.join([shown(sys.executable), shown(sys.argv[0]), *sys.argv[1:]])


def default_out(args: argparse.Namespace) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"grpo_{args.arch}_{args.image_size}px_G{args.group}_B{args.prompts}_L{args.tokens}_{stamp}.json"
    return RESULTS_DIR / name


def print_table(report: dict[str, Any]) -> None:
    sides = report["sides"]
    print(f"\n{report['workload']}")
    for side, r in sides.items():
        if "error" in r:
            print(f"{side:11s} FAILED: {r['error']}")
            continue
        memory = f", peak GPU {r['peak_gpu_memory_gib']:.1f} GiB" if "peak_gpu_memory_gib" in r else ""
        print(
            f"{side:11s} median {r['median_step_s']:.3f} s/step, {r['completions_per_s']:.1f} completions/s, "
            f"{r['completion_tokens_per_s']:.0f} tokens/s, forced length ok: {r['forced_length_ok']}{memory}"
        )
    for key in ("trl_over_ours", "trl_over_ours_static", "eager_over_static"):
        if key in report:
            print(f"{key.replace('_over_', ' / ')} median step time: {report[key]:.2f}x")
    print(f"load average at start: {report['loadavg_start']}  contended: {report['contended']}")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["tiny", "qwen2_5_vl_3b"], default="tiny")
    parser.add_argument("--image-size", type=int, default=None, help="px (default 112 tiny, 448 qwen2_5_vl_3b)")
    parser.add_argument("--group", type=int, default=8, help="G completions per prompt")
    parser.add_argument("--prompts", type=int, default=2, help="B prompts per step")
    parser.add_argument("--tokens", type=int, default=32, help="L: every completion has exactly L tokens")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--finetune", choices=["full", "lora"], default=None, help="default: the model yaml's")
    parser.add_argument("--logprob-chunk-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--sides", default="ours,trl", help="comma-separated subset of ours (eager rollout), ours_static, trl"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=".cache/tiny_models", help="tiny model cache (repo-relative)")
    parser.add_argument("--shrink", action="store_true", help="qwen2_5_vl_3b with 1 LM layer, 1 ViT block (CPU smoke)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: results/grpo_<settings>_<time>.json)")
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = 448 if args.arch == "qwen2_5_vl_3b" else 112
    if args.group < 2 or args.prompts < 1 or args.tokens < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("need --group >= 2, --prompts >= 1, --tokens >= 1, --steps >= 1, --warmup >= 0")
    if args.beta <= 0:
        parser.error("--beta must be > 0: the benchmark includes the reference pass")
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not args.sides or set(args.sides) - {*OUR_SIDES, "trl"}:
        parser.error(f"--sides takes a subset of {', '.join([*OUR_SIDES, 'trl'])}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    load_start = list(os.getloadavg())
    schema = load_schema("adfm")
    # Distinct records for every step of each side; both sides draw from the same list.
    samples, images = make_data(args.image_size, args.prompts * (args.warmup + args.steps))
    runners: dict[str, Callable[..., dict[str, Any]]] = {
        **{side: functools.partial(run_ours, side=side) for side in OUR_SIDES},
        "trl": run_trl,
    }
    report: dict[str, Any] = {
        "command": command_line(),
        "machine": machine(device),
        "loadavg_start": load_start,
        "contended": device.type == "cpu" and load_start[0] >= CONTENDED_LOAD,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workload": (
            f"{args.arch}, {args.image_size}px, B={args.prompts} prompts x G={args.group} x L={args.tokens} "
            f"tokens (forced), beta={args.beta}, mu=1, {args.steps} timed steps after {args.warmup} warm-up"
        ),
        "sides": {},
    }
    out = args.out or default_out(args)
    failed = False
    with tempfile.TemporaryDirectory(prefix="grpo_bench_") as tmp:
        for side in args.sides:
            # Non-zero on the second side would mean the first side's model was not freed.
            held = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
            print(f"running {side} ...", flush=True)
            try:
                report["sides"][side] = runners[side](args, device, schema, samples, images, Path(tmp))
                report["sides"][side]["gpu_memory_held_before_gib"] = held
            except Exception as error:  # noqa: BLE001 - one side's failure must not lose the other's numbers
                traceback.print_exc()
                report["sides"][side] = {"error": f"{type(error).__name__}: {error}"}
                failed = True
            _free(device)  # the side's models are unreachable once its runner returns
            write_report(report, out)  # after each side: a run cut short still leaves what it measured
    sides = report["sides"]
    for ours in OUR_SIDES:
        suffix = "" if ours == "ours" else ours.removeprefix("ours")
        if all("median_step_s" in sides.get(s, {}) for s in (ours, "trl")):
            report[f"trl_over_{ours}"] = sides["trl"]["median_step_s"] / sides[ours]["median_step_s"]
            report[f"same_start_weights{suffix}"] = (
                sides["trl"]["weight_fingerprint"] == sides[ours]["weight_fingerprint"]
            )
    if all("median_step_s" in sides.get(s, {}) for s in OUR_SIDES):
        report["eager_over_static"] = sides["ours"]["median_step_s"] / sides["ours_static"]["median_step_s"]
    report["loadavg_end"] = list(os.getloadavg())
    write_report(report, out)
    print_table(report)
    print(f"written to {out}")
    if failed:
        raise SystemExit(1)
    return report


def write_report(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
