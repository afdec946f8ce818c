"""The repository's promises about itself: CI runs the README's test command; each stage is declared."""

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_two_quick_start_commands_and_ci_runs_the_test_one():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    assert "dvc repro" in commands[0] and "pytest" in commands[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


def test_every_stage_lists_its_module_as_a_dependency():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        cmds = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
        for cmd in cmds:
            module = re.search(r"python -m ([\w.]+)", cmd).group(1)
            path = module.replace(".", "/") + ".py"
            assert (REPO / path).exists(), (name, path)
            assert any(path == d or path.startswith(d.rstrip("/") + "/") for d in stage.get("deps", [])), (name, path)
