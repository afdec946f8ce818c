"""The repository's promises about itself: CI runs the README's test command; each stage is declared with every
module it imports among its dependencies."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "features", "heads", "baselines")


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


def _module_file(name: str) -> Path | None:
    for candidate in (REPO / (name.replace(".", "/") + ".py"), REPO / name.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(path: Path, name: str):
    """Every module name an import statement of ``path`` may load (top-level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_closure(module: str) -> set[str]:
    """The project's files that ``python -m module`` imports, directly or through other project modules."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name.split(".")[0] not in PACKAGES or (path := _module_file(name)) is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run their __init__
        todo += list(_imported(path, name))
    return {p.relative_to(REPO).as_posix() for p in seen if not _is_empty_init(p)}


def _is_empty_init(path: Path) -> bool:
    """A package ``__init__.py`` holding nothing but a docstring changes no stage's result."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                                              for n in body)


def _stages() -> list[tuple[str, str, list[str]]]:
    """``(stage, command, deps)`` of every stage, foreach/matrix expanded by DVC itself."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        return [(stage.addressing, stage.cmd if isinstance(stage.cmd, str) else " ".join(stage.cmd),
                 [dep.def_path for dep in stage.deps]) for stage in repo.index.stages]


def test_import_closure_follows_imports_inside_functions():
    closure = import_closure("pipeline.experiment")
    assert {"pipeline/experiment.py", "pipeline/augment.py", "pipeline/labels.py", "pipeline/roots.py",
            "pipeline/split.py", "pipeline/audio.py"} <= closure  # augment is imported inside a function
    assert "pipeline/compare.py" not in closure


@pytest.mark.parametrize("stage, cmd, deps", [pytest.param(*s, id=s[0]) for s in _stages()])
def test_every_module_a_stage_imports_is_among_its_dependencies(stage, cmd, deps):
    """Otherwise a change to that module leaves the stage's results silently stale."""
    module = re.search(r"python -m ([\w.]+)", cmd).group(1)
    closure = import_closure(module)
    assert closure, (stage, module)
    covered = [path for path in closure
               if any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)]
    assert sorted(set(closure) - set(covered)) == [], f"{stage}: dvc.yaml's deps miss these imports"
