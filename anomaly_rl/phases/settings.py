"""Every setting checked at start, before any data is read or weights are loaded.

`preflight` names what a configuration still needs (a model folder, a dataset root);
`check_settings` instantiates the phases' settings (conf/algo) and validates every range, naming
each setting as the user writes it.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from anomaly_rl.grpo.settings import GRPOSettings
from anomaly_rl.models.loading import check_model_folder
from anomaly_rl.rollout.backends import ROLLOUT_BACKENDS
from anomaly_rl.sft.settings import SFTSettings
from anomaly_rl.training.distributed import check_divisible


class MissingSettingError(ValueError):
    """A setting the chosen config needs from the user (a model folder, a dataset root) is unset."""


def preflight(cfg: DictConfig) -> None:
    """Stop at once, saying what to set, before any data is read or model is built."""
    missing = []
    model_name = str(cfg.model.get("name", "tiny"))
    if model_name != "tiny" and not cfg.model.get("path"):
        repo = cfg.model.get("hf_repo") or "the model's Hugging Face repository"
        missing.append(
            f"model.path=<folder with the {model_name} weights> "
            f"(download once: huggingface-cli download {repo} --local-dir <folder>)"
        )
    if "root" in cfg.data.keys() and OmegaConf.is_missing(cfg.data, "root"):
        missing.append(f"data.root=<folder of the {cfg.data.get('reader', 'dataset')} dataset>")
    if missing:
        raise MissingSettingError("this configuration needs: " + "; ".join(missing))
    if cfg.model.get("path"):  # a wrong folder fails now, not after the dataset has been read
        check_model_folder(cfg.model)


WARM_START_SWITCHES = ("enabled", "checkpoint")
"""Keys of the `warm_start` block that say whether and from where, not how: not SFT settings."""


def sft_settings(block: DictConfig) -> SFTSettings:
    """The SFT settings of `algo` (algo=sft), `warm_start` or the control (conf/algo/sft.yaml)."""
    keys = [k for k in block if k not in WARM_START_SWITCHES]
    return hydra.utils.instantiate(OmegaConf.masked_copy(block, keys))


def _eval_problems(eval_cfg: DictConfig) -> list[str]:
    limit = eval_cfg.get("limit")
    checks = [
        (str(eval_cfg.split) in ("train", "val", "test"), f"split must be train, val or test, got {eval_cfg.split!r}"),
        (int(eval_cfg.batch_size) >= 1, f"batch_size must be >= 1, got {eval_cfg.batch_size}"),
        (int(eval_cfg.max_new_tokens) >= 1, f"max_new_tokens must be >= 1, got {eval_cfg.max_new_tokens}"),
        (limit is None or int(limit) >= 1, f"limit must be null or >= 1, got {limit}"),
        (
            str(eval_cfg.get("rollout_backend", "eager")) in ROLLOUT_BACKENDS,
            f"rollout_backend must be one of {', '.join(sorted(ROLLOUT_BACKENDS))}, got {eval_cfg.get('rollout_backend')!r}",
        ),
    ]
    return [f"eval.{message}" for ok, message in checks if not ok]


def check_settings(
    cfg: DictConfig, min_new_tokens: int, processes: int
) -> tuple[GRPOSettings | SFTSettings, SFTSettings | None]:
    """Instantiate and validate every algo.*, warm_start.*, control.* and eval.* setting at once.

    Returns the settings of the main phase and those of the warm start (None when no phase uses
    them). Raises ValueError listing every problem found, before any data or weights are loaded.
    """
    algo = str(cfg.algo.name)
    problems: list[str] = []
    warm_start: SFTSettings | None = None
    if algo == "grpo":
        settings: GRPOSettings | SFTSettings = hydra.utils.instantiate(cfg.algo)
        problems += settings.problems(min_new_tokens)
        if cfg.warm_start.enabled or cfg.control.enabled:
            warm_start = sft_settings(cfg.warm_start)
            problems += warm_start.problems("warm_start")
        if cfg.control.enabled and float(cfg.control.lr) <= 0:
            problems.append(f"control.lr must be > 0, got {cfg.control.lr}")
    elif algo == "sft":
        settings = sft_settings(cfg.algo)
        problems += settings.problems("algo")
    else:
        raise ValueError(f"algo.name must be grpo or sft, got {algo!r}")
    if cfg.eval.enabled:
        problems += _eval_problems(cfg.eval)
    if problems:
        raise ValueError("; ".join(problems))
    if processes > 1:  # each process takes whole groups, and an equal share of every SFT batch
        if isinstance(settings, GRPOSettings):
            check_divisible(settings.prompts_per_step, settings.mini_batches, processes, "algo.prompts_per_step")
        else:
            check_divisible(settings.batch_size, 1, processes, "algo.batch_size")
        if warm_start is not None:
            check_divisible(warm_start.batch_size, 1, processes, "warm_start.batch_size")
    return settings, warm_start
