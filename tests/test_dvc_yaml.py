"""dvc.yaml against the code: every stage depends on all the library code and params that shape
its output. Derived from the sources, so the check cannot drift from what the scripts do."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import yaml

from conftest import REPO

PACKAGE = "captioning"
# Modules that cannot change a stage's output, and why; everything else a stage imports is a dep.
NOT_DEPENDENCIES = {
    "io": "atomic file writes, JSON reads and file digests (bytes in, bytes out)",
    "errors": "the user-error classes (cannot change an output)",
    "stage": "runs a stage's main: the one-line report of a user's mistake, the stage's time",
    "tracking": "MLflow logging",
    "registry": "the MLflow model registry (versions and the champion alias)",
    "lineage": "what the pipeline run did (stage times, dvc.lock md5s), for the MLflow record",
    "serving": "packaging the MLflow model (the checkpoint and decoding files are outputs already)",
    "params": "parsing and checking params.yaml; every value comes from params.yaml, which spells out "
              "every key (test_params), and DVC tracks the values",
}
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def imported_modules(path: Path) -> set[str]:
    """The `captioning` modules a file imports, anywhere in it (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == PACKAGE:
                found |= {alias.name for alias in node.names}
            elif node.module.startswith(PACKAGE + "."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(PACKAGE + ".")}
    return found


def closure(script: Path) -> set[str]:
    """Every library module `script` imports, directly or through other library modules."""
    library = REPO / "src" / PACKAGE
    todo, seen = imported_modules(script), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo |= imported_modules(library / f"{name}.py") - seen
    return seen


def test_the_package_init_holds_no_code_a_stage_could_depend_on():
    init = REPO / "src" / PACKAGE / "__init__.py"  # a namespace package has none
    tree = ast.parse(init.read_text() if init.is_file() else "")
    assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in tree.body), \
        "__init__.py runs before every module: either keep it empty or make it a dependency of every stage"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_imported_library_module_is_a_dependency(stage):
    spec = STAGES[stage]
    script = REPO / spec["cmd"].split()[1]
    assert script.parent.name == "stages" and str(script.relative_to(REPO)) in spec["deps"]
    needed = {f"src/{PACKAGE}/{m}.py" for m in closure(script) - set(NOT_DEPENDENCIES)}
    listed = {d for d in spec["deps"] if d.startswith(f"src/{PACKAGE}/")}
    assert needed - listed == set(), f"dvc.yaml: stage {stage} lacks these deps"
    assert listed - needed == set(), f"dvc.yaml: stage {stage} lists deps its script never imports"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_declares_the_params_dvc_tracks_for_it(stage):
    """A stage reads its params through load_params(path, PARAMS), which refuses anything
    undeclared; PARAMS must be exactly the stage's `params:` in dvc.yaml."""
    script = REPO / STAGES[stage]["cmd"].split()[1]
    module_spec = importlib.util.spec_from_file_location(f"stage_{stage}", script)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    assert sorted(module.PARAMS) == sorted(STAGES[stage]["params"])
    assert "load_params(" in script.read_text() and "PARAMS)" in script.read_text()


def test_the_allowlist_names_real_modules():
    for name in NOT_DEPENDENCIES:
        assert (REPO / "src" / PACKAGE / f"{name}.py").is_file(), name


def test_no_param_is_named_like_a_field_dvc_leaves_out_of_its_run_cache_key():
    """DVC hashes a stage's lock entry without any key named `size` or `nfiles`, params included:
    a param of that name could change and DVC would restore the outputs of its old value."""
    def keys(node, prefix=""):
        for key, value in node.items():
            yield from keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [(key, prefix + key)]

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert [full for key, full in keys(params) if key in ("size", "nfiles")] == []


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_the_folder_of_files_params_name_is_a_dependency(stage):
    """Files that params name live in the folder the stage gets as --inputs (inputs/README.md)."""
    words = STAGES[stage]["cmd"].split()
    for flag, value in zip(words, words[1:]):
        if flag == "--inputs":
            assert value in STAGES[stage]["deps"] and (REPO / value).is_dir()


def test_the_library_has_no_import_cycle():
    """Modules import each other one way (e.g. predict -> model, never back): a cycle means two
    concepts share a home, and the order of imports starts to matter."""
    library = REPO / "src" / PACKAGE
    graph = {p.stem: imported_modules(p) - {p.stem} for p in library.glob("*.py")}

    def cycle_from(node, path):
        if node in path:
            return path[path.index(node):] + [node]
        for nxt in sorted(graph.get(node, ())):
            found = cycle_from(nxt, path + [node])
            if found:
                return found
        return None

    for module in sorted(graph):
        assert cycle_from(module, []) is None, " -> ".join(cycle_from(module, []))
