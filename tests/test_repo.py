"""The repository's promises about itself: CI runs the README's test command; each stage is declared with every
module it imports among its dependencies."""

import ast
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "features", "training", "heads", "baselines", "evaluation", "inference")


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
    closure = import_closure("inference.inputs")
    assert {"inference/inputs.py", "inference/model.py", "training/rundir.py", "features/store.py",
            "features/encoder.py"} <= closure  # the encoder is imported inside a function
    assert "pipeline/compare.py" not in closure and "heads/predict.py" not in closure


@pytest.mark.parametrize("stage, cmd, deps", [pytest.param(*s, id=s[0]) for s in _stages()])
def test_every_module_a_stage_imports_is_among_its_dependencies(stage, cmd, deps):
    """Otherwise a change to that module leaves the stage's results silently stale."""
    module = re.search(r"python -m ([\w.]+)", cmd).group(1)
    closure = import_closure(module)
    assert closure, (stage, module)
    covered = [path for path in closure
               if any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)]
    assert sorted(set(closure) - set(covered)) == [], f"{stage}: dvc.yaml's deps miss these imports"


def _readme_commands() -> list[tuple[str, list[str]]]:
    """Each ``python -m <project module> ...`` command of the README's bash blocks: ``(module, argv)``."""
    readme = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.+?)\n```", readme, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                found = re.search(r"python -m ([\w.]+)(.*)", part)
                if found and found.group(1).split(".")[0] in PACKAGES:
                    commands.append((found.group(1), shlex.split(found.group(2))))
    return commands


class _Parsed(BaseException):
    """Raised in place of running a command once its argv has parsed (not an Exception: nothing catches it)."""


def test_the_readme_documents_a_command_of_every_stage_module():
    modules = {module for module, _ in _readme_commands()}
    assert {"pipeline.augment", "pipeline.compare", "heads.train", "baselines.train", "baselines.probe",
            "heads.predict"} <= modules


@pytest.mark.parametrize("module, argv", [pytest.param(m, a, id=f"{m}-{i}")
                                          for i, (m, a) in enumerate(_readme_commands())])
def test_every_readme_command_parses_as_documented(module, argv, monkeypatch, tmp_path):
    """The documented flags are the CLI's flags: each README command's argv parses (running them needs data)."""
    import argparse
    import importlib
    import shutil

    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))  # a bad flag exits with status 2 before this

    # the CLIs check that their inputs exist: lay the paths the command names out in an empty project folder
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")  # --settings params.yaml
    for arg in argv:
        if not arg.startswith("-") and ("/" in arg or Path(arg).suffix) and not (tmp_path / arg).exists():
            target = tmp_path / arg
            if Path(arg).suffix:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
            else:
                target.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(_Parsed):
        importlib.import_module(module).main(argv)


def _project_modules() -> list[str]:
    return sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                  for package in PACKAGES for p in (REPO / package).rglob("*.py"))


def test_no_two_project_modules_import_each_other():
    """Layers point down: a module never imports one that (directly or through others) imports it back. A
    package importing its own submodules is the package's registry, not a cycle."""
    modules = set(_project_modules())
    edges = {m: {i for i in _imported(_module_file(m), m) if i in modules and i != m
                 and not (i.startswith(m + ".") or m.startswith(i + "."))} for m in modules}
    cycles = []
    for start in sorted(modules):
        seen, todo = set(), list(edges[start])
        while todo:
            m = todo.pop()
            if m == start:
                cycles.append(start)
                break
            if m not in seen:
                seen.add(m)
                todo += edges[m]
    assert cycles == [], f"modules on an import cycle: {cycles}"


#: The layers, lowest first (docs/ARCHITECTURE.md): a module imports only modules of its own layer or lower ones.
#: A name is a module or a package (every module below it); commands that users type keep their names
#: (``pipeline.compare``, ``heads.predict``) and sit on the layer of what they run.
LAYERS = {
    "ground floor": ["pipeline", "pipeline.audio", "pipeline.cli", "pipeline.corpora", "pipeline.experiment",
                     "pipeline.labels", "pipeline.metrics", "pipeline.normalisation", "pipeline.processes",
                     "pipeline.roots", "pipeline.split", "pipeline.tables"],
    "data stages": ["pipeline.pull", "pipeline.manifest", "pipeline.augment"],
    "feature stores": ["features"],
    "training core": ["training"],
    "systems": ["heads", "heads.models", "heads.train", "baselines"],
    "evaluation": ["evaluation", "pipeline.compare"],
    "inference": ["inference", "heads.predict"],
}


def layer_of(module: str) -> int | None:
    """The position in :data:`LAYERS` of the longest name that is ``module`` or a package above it."""
    best, found = -1, None
    for position, names in enumerate(LAYERS.values()):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, found = len(name), position
    return found


def test_every_project_module_has_a_layer():
    assert [m for m in _project_modules() if layer_of(m) is None] == []


def upward_imports(module: str, path: Path) -> list[str]:
    """Imports of ``module`` (its source at ``path``), at the top or inside functions, of a higher layer."""
    names, modules = list(LAYERS), set(_project_modules())
    return sorted(f"{module} ({names[layer_of(module)]}) imports {imported} ({names[layer_of(imported)]})"
                  for imported in set(_imported(path, module)) & modules
                  if layer_of(imported) > layer_of(module))


def test_imports_point_down_the_layers():
    assert [line for m in _project_modules() for line in upward_imports(m, _module_file(m))] == []


def test_the_layer_check_sees_an_upward_import_even_inside_a_function(tmp_path):
    source = tmp_path / "labels.py"
    source.write_text("import numpy\n\n\ndef f():\n    from heads.predict import main\n    return main\n")
    assert upward_imports("pipeline.labels", source) == [
        "pipeline.labels (ground floor) imports heads.predict (inference)"]
    source.write_text("from pipeline.split import read_split\n")
    assert upward_imports("pipeline.labels", source) == []
