"""Every setting of every experiment does something.

For the groups that are instantiated (`algo`, `warm_start`, `reward`, `schema`, `data`), each leaf is
changed to another value in the composed config of every experiment and the group instantiated
again: the object must differ from the one built from the unchanged config (or refuse the value).
A key that an object accepts and ignores fails here, as `GRPOSettings.num_references` and the
datamodule's unused `batch_size` would have.

The groups read by name rather than instantiated (`eval`, `control`, the warm start's switches,
`model`, the run-level keys) are checked against the code that reads them: each key must be read
somewhere in the package. The trainer, logger and callbacks groups are keyword arguments of
Lightning and W&B classes, which reject unknown ones themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from pathlib import Path
from typing import Any

import hydra
import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from tests.test_configs import EXPERIMENTS, compose_train

ROOT = Path(__file__).resolve().parents[1]
INSTANTIATED = ("algo", "warm_start", "reward", "schema", "data")
READ_BY_NAME = ("eval", "control", "model")
RUN_KEYS = ("seed", "resume", "init_from", "pause_after_steps", "task_name", "tags")
# The package, and the Hydra configs that read run-level keys by interpolation (`${task_name}`).
SOURCE = "\n".join(
    p.read_text(encoding="utf-8")
    for p in [*(ROOT / "anomaly_rl").rglob("*.py"), *(ROOT / "conf" / "hydra").glob("*.yaml")]
)


def leaves(node: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            if key in ("_target_", "_partial_", "_convert_", "_recursive_"):
                continue
            path = f"{prefix}{key}"
            value = node._get_node(key)
            if isinstance(value, DictConfig) and not OmegaConf.is_interpolation(node, key):
                out += leaves(value, f"{path}.")
            else:
                out.append(path)
    return out


def changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 + 0.125
    if isinstance(value, str):
        return value + "_changed"
    if value is None:
        return 1
    if isinstance(value, list | ListConfig):
        return [changed(value[0]), *list(value)[1:]] if len(value) else [1]
    raise TypeError(f"no changed value for {value!r}")


def fingerprint(obj: Any, depth: int = 0) -> Any:
    """A comparable picture of an object's state, a few levels deep."""
    if depth > 5:
        return type(obj).__name__
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: fingerprint(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)}
    if isinstance(obj, DictConfig | ListConfig):
        return fingerprint(OmegaConf.to_container(obj, resolve=True), depth + 1)
    if isinstance(obj, functools.partial):
        return (obj.func, fingerprint(obj.keywords, depth + 1))
    if isinstance(obj, dict):
        return {str(k): fingerprint(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [fingerprint(v, depth + 1) for v in obj]
    if isinstance(obj, int | float | str | bool | type(None) | Path):
        return obj
    if hasattr(obj, "__dict__"):
        return {k: fingerprint(v, depth + 1) for k, v in vars(obj).items() if not k.startswith("__")}
    return repr(obj)


def build(cfg: DictConfig, group: str) -> Any:
    if group == "warm_start":
        from anomaly_rl.phases.settings import sft_settings

        return sft_settings(cfg.warm_start)
    return hydra.utils.instantiate(cfg[group])


@functools.cache
def composed(experiment: str) -> DictConfig:
    """The composed train config of an experiment ("default": none), composed once per test session."""
    return compose_train(Path("/tmp/anomaly_rl_settings_reach"), [] if experiment == "default" else [f"+experiment={experiment}"])


def groups() -> list[tuple[str, str]]:
    return [
        (experiment, group)
        for experiment in ["default", *EXPERIMENTS]
        for group in INSTANTIATED
        if not OmegaConf.is_interpolation(composed(experiment), group)  # `algo: ${warm_start}`: via that group
    ]


def settings_of(cfg: DictConfig, group: str) -> list[str]:
    return [p for p in leaves(cfg[group]) if not (group == "warm_start" and p in ("enabled", "checkpoint"))]


GROUPS = groups()


def test_the_walk_finds_the_settings() -> None:
    cfg = composed("default")
    assert {"eps_low", "optimizer.lr", "dynamic_sampling.max_rounds"} <= set(settings_of(cfg, "algo"))
    assert "optimizer.lr" in settings_of(cfg, "warm_start")
    assert ("warm_start", "sft") not in GROUPS and ("default", "data") in GROUPS


@pytest.mark.parametrize(("experiment", "group"), GROUPS, ids=["/".join(c) for c in GROUPS])
def test_every_instantiated_setting_reaches_its_object(experiment: str, group: str) -> None:
    base = composed(experiment)
    before = fingerprint(build(base, group))
    ignored = []
    for path in settings_of(base, group):
        cfg = copy.deepcopy(base)
        value = OmegaConf.select(cfg[group], path)
        with open_dict(cfg):
            OmegaConf.update(cfg[group], path, changed(value), merge=False)
        try:
            after = fingerprint(build(cfg, group))
        except Exception:  # the object inspected the value and refused it: the setting reaches it
            continue
        if after == before:
            ignored.append(f"{group}.{path} (= {value!r})")
    assert not ignored, f"settings that change nothing in what `{group}` instantiates: {ignored}"


def _read_in_source(key: str) -> bool:
    return bool(re.search(rf"(\.{re.escape(key)}\b|[\"']{re.escape(key)}[\"']|\$\{{{re.escape(key)}\}})", SOURCE))


@pytest.mark.parametrize("experiment", ["default", *EXPERIMENTS])
def test_every_setting_read_by_name_is_read(experiment: str) -> None:
    cfg = composed(experiment)
    keys = [(g, p) for g in READ_BY_NAME for p in leaves(cfg[g])]
    keys += [("warm_start", k) for k in ("enabled", "checkpoint")] + [("", k) for k in RUN_KEYS]
    unread = [f"{g}.{p}" if g else p for g, p in keys if not _read_in_source(p.split(".")[-1])]
    assert not unread, f"settings no code reads: {unread}"


@pytest.mark.parametrize(
    "settings_class",
    ["anomaly_rl.grpo.settings.GRPOSettings", "anomaly_rl.grpo.settings.DynamicSampling", "anomaly_rl.sft.settings.SFTSettings"],
)
def test_every_settings_field_is_used(settings_class: str) -> None:
    """A settings dataclass carries every yaml key by construction, so the instantiation check above
    cannot see a field nobody reads: each field must be read (`.field`) outside its own file."""
    module_name, _, class_name = settings_class.rpartition(".")
    module = __import__(module_name, fromlist=[class_name])
    own = Path(module.__file__).resolve()
    elsewhere = "\n".join(
        p.read_text(encoding="utf-8") for p in (ROOT / "anomaly_rl").rglob("*.py") if p.resolve() != own
    )
    unused = [
        f.name for f in dataclasses.fields(getattr(module, class_name))
        if f.name != "name" and not re.search(rf"\.{f.name}\b", elsewhere)
    ]
    assert not unused, f"{class_name} fields no code reads: {unused}"
