"""Every `python -m anomaly_rl.<entry point> ...` command the README shows composes as written.

The README is what users copy; a command that Hydra rejects ("Could not override") is a defect of
the docs or of the configs. Each command is composed with its entry point's root config (as
`--cfg job` would), multirun sweeps with the first value of each swept key, and a train command
also has its settings instantiated and validated, which is what the entry point does first.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
ROOT_CONFIGS = {
    "train": "train", "evaluate": "eval", "predict": "predict", "score": "score",
    "score_mmad": "score_mmad", "export": "export",
}
COMMAND = re.compile(r"python -m anomaly_rl\.(\w+)((?:[ \t]+(?:<[^<>\n]+>|[^\s`|&;])+)*)")


def readme_commands() -> list[tuple[str, list[str]]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = []
    for match in COMMAND.finditer(text):
        entry, rest = match.group(1), match.group(2)
        # Placeholders the reader fills in (`<run folder>`) become a path; `# ...` is a comment.
        args = shlex.split(re.sub(r"<[^<>]+>", "/placeholder", rest), comments=True)
        if entry == "score" and args[:1] == ["mmad"]:  # `score mmad ...` is score_mmad's command
            entry, args = "score_mmad", args[1:]
        found.append((entry, args))
    return found


def _overrides(args: list[str]) -> list[str]:
    out = []
    for arg in args:
        if arg in ("-m", "--multirun") or arg.startswith("--") or arg in ("job",) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if "," in value and not value.startswith("["):
            value = value.split(",")[0]  # a sweep: its first job
        out.append(f"{key}={value}")
    return out


COMMANDS = readme_commands()


def test_the_readme_shows_commands() -> None:
    assert len(COMMANDS) >= 5


@pytest.mark.parametrize(("entry", "args"), COMMANDS, ids=[" ".join([e, *a]) for e, a in COMMANDS])
def test_readme_command_composes(entry: str, args: list[str]) -> None:
    assert entry in ROOT_CONFIGS, f"the README runs anomaly_rl.{entry}, which is no entry point known here"
    assert (ROOT / "anomaly_rl" / f"{entry}.py").is_file(), f"anomaly_rl/{entry}.py does not exist"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(ROOT_CONFIGS[entry], overrides=_overrides(args))
    if entry == "train":
        from anomaly_rl.phases.settings import check_settings

        check_settings(cfg, min_new_tokens=1, processes=1)


def test_every_entry_point_runs_its_main_once() -> None:
    """A second `if __name__ == "__main__": main()` would run a whole training twice per command."""
    for entry in ROOT_CONFIGS:
        text = (ROOT / "anomaly_rl" / f"{entry}.py").read_text(encoding="utf-8")
        assert text.count('if __name__ == "__main__":') == 1, entry
