"""The structure of the package: imports point one way, and the run directory has one owner."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from bdvae import rundir

PACKAGE = Path(rundir.__file__).parent
MAX_LEVELS = 8  # floors of the import graph: a module that imports no bdvae module is on floor 1; the API (7) sits on compare (6)


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.glob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at module level or inside functions alike
    (`from bdvae import __version__` counts as importing the package's __init__)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "bdvae":
                deps |= {a.name if a.name in modules else "__init__" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bdvae."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] if "." in a.name else "__init__" for a in node.names
                         if a.name.split(".")[0] == "bdvae"}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor: 1 + the highest floor it imports; ValueError naming a cycle."""
    found: dict[str, int] = {}

    def floor(name: str, path: tuple[str, ...]) -> int:
        if name in path:
            raise ValueError("import cycle: " + " -> ".join(path[path.index(name):] + (name,)))
        if name not in found:
            found[name] = 1 + max((floor(d, path + (name,)) for d in graph[name]), default=0)
        return found[name]

    for name in graph:
        floor(name, ())
    return found


def test_the_import_graph_has_no_cycle_and_few_floors():
    levels = floors(import_graph())
    top = max(levels.values())
    assert top <= MAX_LEVELS, sorted(levels.items(), key=lambda kv: -kv[1])
    ground = {name for name, level in levels.items() if level == 1}
    assert {"errors", "files", "likelihoods", "regularizers", "metrics"} <= ground


def test_a_cycle_is_found():
    with pytest.raises(ValueError, match="import cycle: a -> b -> a"):
        floors({"a": {"b"}, "b": {"a"}})
    assert floors({"a": {"b"}, "b": set()}) == {"a": 2, "b": 1}


def test_the_facade_and_the_ground_floor_stay_where_they_are():
    graph = import_graph()
    assert not [name for name, deps in graph.items() if "api" in deps and name not in ("__init__", "__main__")]
    assert graph["files"] == set() and graph["errors"] == set()


def _run_dir_names() -> set[str]:
    """Every file and folder name of a run directory, as rundir.py spells them."""
    return {value.split("/")[-1] for key, value in vars(rundir).items()
            if key.isupper() and isinstance(value, str) and key.endswith(("_FILE", "_LOG", "_DIR", "_CURVE", "S"))
            and key not in ("GENERATOR_KEY",)} | {rundir.ORIGINALS, rundir.RECONSTRUCTIONS, rundir.SAMPLES}


def _code_strings(tree: ast.Module) -> list[str]:
    """The string constants of a module's code: not its docstrings."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def _joined_paths(tree: ast.Module) -> list[str]:
    """The strings joined to a path with `/` (`run_dir / "checkpoints"`)."""
    return [node.right.value for node in ast.walk(tree) if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
            and isinstance(node.right, ast.Constant) and isinstance(node.right.value, str)]


def test_no_run_directory_name_is_spelled_outside_rundir():
    """A file name (config.toml, eval/...) in another module's code, or a folder of the run
    directory joined to a path there: either spells what only rundir.py may spell. (A folder's
    bare name, such as "samplers", is also a key of metrics.json, so it counts only in a path.)"""
    names = _run_dir_names()
    assert {"config.toml", "run.json", "model.safetensors", "metrics.jsonl", "metrics.json", "checkpoints", "eval",
            "samplers", "samples.png"} <= names
    files = {n for n in names if "." in n}
    spelled = []
    for module, tree in _modules().items():
        if module == "rundir":
            continue
        for text in _code_strings(tree):
            for token in re.split(r"[\s'\"(),;:]+", text):
                if token in files or any(token.startswith(f"{n}/") or token.endswith(f"/{n}") for n in names):
                    spelled.append(f"{module}: {text!r}")
        spelled += [f"{module}: / {text!r}" for text in _joined_paths(tree) if text in names]
    assert not spelled
