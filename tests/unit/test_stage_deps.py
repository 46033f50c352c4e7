"""dvc.yaml cannot drift from the code: every module a stage runs is one of its DVC dependencies.

The import closure of each stage module is computed from the source (every `import` of a module
inside the repository, including those inside functions, and the package `__init__.py` files an
import runs), then held against the stage's `deps`: a code change that DVC would not see is a
failure naming the stage and the module.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from imgpipe.core import params
ROOT = Path(__file__).resolve().parents[2]
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]
# the repository's own top-level packages; anything else is a third-party import
OWN = ("imgpipe", "stages")
TENSORFLOW = ("tensorflow", "keras", "tensorflow_hub", "tf_keras")


def module_file(name: str) -> Path | None:
    """The file of module `name` when it is the repository's own, else None."""
    if name.split(".")[0] not in OWN:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path) -> set[str]:
    """Every module name `path` imports, anywhere in it, with the packages each import runs."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # `from imgpipe.model import shards` imports the module imgpipe.model.shards
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    parents = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}
    return names | parents


def closure(path: Path) -> set[Path]:
    """The repository's files that running `path` imports, `path` included."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(f for f in map(module_file, imported_names(current)) if f is not None)
    return seen


def code_deps(stage: dict) -> list[str]:
    return [d for d in stage["deps"] if "${" not in d and d.split("/")[0] in OWN]


def uncovered(files: set[Path], deps: list[str]) -> list[str]:
    def covered(f: Path) -> bool:
        return any(f == ROOT / d or (ROOT / d) in f.parents for d in deps)
    return sorted(str(f.relative_to(ROOT)) for f in files if not covered(f))


def stage_module(name: str) -> Path:
    return ROOT / "stages" / f"{name}.py"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_module_a_stage_imports_is_one_of_its_deps(name):
    stage = STAGES[name]
    assert stage["cmd"] == f"python -m stages.{name}"
    missing = uncovered(closure(stage_module(name)), code_deps(stage))
    assert not missing, f"dvc.yaml stage {name} runs these modules but does not depend on them: {missing}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_code_dep_of_a_stage_is_code_it_runs(name):
    """A dep the stage does not import re-runs it for nothing; and each dep is needed, so the
    check above fails when any one of them is removed."""
    reached = closure(stage_module(name))
    deps = code_deps(STAGES[name])
    for dep in deps:
        others = [d for d in deps if d != dep]
        assert uncovered(reached, others), f"dvc.yaml stage {name} depends on {dep}, which it never imports"


def test_a_removed_dependency_is_found():
    deps = [d for d in code_deps(STAGES["preprocess"]) if d != "imgpipe/images"]
    assert "imgpipe/images/transforms.py" in uncovered(closure(stage_module("preprocess")), deps)


def test_stages_holds_the_dvc_stages_and_nothing_else():
    modules = {p.stem for p in (ROOT / "stages").glob("*.py")}
    assert modules == set(STAGES)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_no_stage_imports_another_stage(name):
    others = [n for n in imported_names(stage_module(name)) if n.startswith("stages")]
    assert not others, f"stages/{name}.py imports {others}: shared code belongs in imgpipe/"


def test_the_data_and_image_packages_never_import_tensorflow():
    """ingest forks worker processes: TensorFlow must not be loaded in it (nor in validate, split, rebalance)."""
    for package in ("imgpipe/core", "imgpipe/data", "imgpipe/images"):
        for path in sorted((ROOT / package).glob("*.py")):
            heavy = {n.split(".")[0] for n in imported_names(path)} & set(TENSORFLOW)
            assert not heavy, f"{path.relative_to(ROOT)} imports {sorted(heavy)}"
    for name in ("ingest", "validate", "split", "rebalance"):
        model = [str(f.relative_to(ROOT)) for f in closure(stage_module(name)) if "imgpipe/model" in str(f)]
        assert not model, f"stage {name} reaches the TensorFlow package: {model}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stage_lists_every_key_of_its_own_section_and_the_others_it_takes(name):
    """run() takes the sections in SECTIONS, its own first: dvc.yaml lists every key of that one
    (a key added to the class re-runs the stage when it changes), and keys of each other one it
    takes but paths and runtime. Never a bare section name: DVC's run-cache ignores those."""
    tree = ast.parse(stage_module(name).read_text())
    sections = next(ast.literal_eval(n.value) for n in tree.body
                    if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "SECTIONS")
    listed = STAGES[name].get("params", [])
    assert sections[0] == name, f"{name}: run must take its own section first"
    fields = {f.name for f in dataclasses.fields(getattr(params, name.capitalize()))}
    own = {p.split(".", 1)[1] for p in listed if p.startswith(f"{name}.")}
    assert own == fields, f"dvc.yaml {name} params: missing {sorted(fields - own)}, unknown {sorted(own - fields)}"
    for section in sections[1:]:
        if section in ("paths", "runtime"):
            continue  # paths are deps and outs themselves; runtime changes speed only
        assert any(p.startswith(f"{section}.") for p in listed), f"{name} takes {section} but lists none of its keys"
    assert all("." in p for p in listed), f"{name}: a whole section in params: {[p for p in listed if '.' not in p]}"
    assert not [p for p in listed if p.startswith("runtime.")], "runtime must not be a stage's param"
