"""One source of defaults: the YAML in conf/. Every key there is read by the code, and the code keeps no default
of its own that could disagree with it.

- Algorithms: the keys of conf/algo/<name>.yaml are exactly the keyword-only parameters of the class it names (and
  of the bases it forwards them to), none of which has a default; nested groups (safe_dpo's lagrangian, sampling,
  beta_scaling) likewise.
- Every other group: each key of each file is read somewhere in src/ or train.py (an attribute access `.key`, or the
  string "key" as a subscript or `get` argument), found by parsing the code; and no config read passes a fallback
  value (`cfg.group.get("key", 0.1)`), which would be a second default.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import yaml
from hydra.utils import get_class

from conftest import CONF, REPO
from peftlab.algos.lagrangian import LagrangeMultiplier
from peftlab.algos.safe_dpo import SAMPLING_KEYS
from peftlab.build import INJECTED, algorithm_keys

ALGOS = sorted(p.stem for p in (CONF / "algo").glob("*.yaml"))
GROUPS = sorted(d.name for d in CONF.iterdir() if d.is_dir() and d.name not in ("algo", "hydra", "experiment"))
USER_NAMED = {("eval", "tasks")}  # children are names the user picks (task names), their own keys are checked
HYDRA_KEYS = {"defaults", "hydra", "_target_"}


def code_files() -> list[Path]:
    return sorted((REPO / "src" / "peftlab").rglob("*.py")) + [REPO / "train.py"]


def names_read(files: list[Path]) -> set[str]:
    """Attribute names, string constants used as subscripts, `in` tests or get/getattr/select arguments, and
    keyword-only parameters (a group handed whole to a constructor, as a task runner's options are, is read by
    its keyword-only parameters)."""
    found = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.update(a.arg for a in node.args.kwonlyargs)
            elif isinstance(node, ast.Attribute):
                found.add(node.attr)
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                found.add(str(node.slice.value))
            elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant):
                found.add(str(node.left.value))
            elif isinstance(node, ast.Call):
                func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if func in ("get", "getattr", "select", "hasattr"):
                    found.update(str(a.value) for a in node.args if isinstance(a, ast.Constant))
    return found


def leaf_keys(tree: dict, prefix: tuple = ()) -> list[tuple[str, ...]]:
    """Key paths of a YAML mapping (a mapping value's own keys too; list items are data, not keys)."""
    paths = []
    for key, value in tree.items():
        if key in HYDRA_KEYS:
            continue
        path = (*prefix, str(key))
        paths.append(path)
        if isinstance(value, dict):
            if path in USER_NAMED:
                for child in value.values():
                    if isinstance(child, dict):
                        paths += [(*path, "<task>", k) for k in child]
            else:
                paths += leaf_keys(value, path)
    return paths


def config_keys() -> list[tuple[str, str, tuple[str, ...]]]:
    """(file, group, key path) for every key of every non-algo group file and of config.yaml's own keys."""
    rows = [("config.yaml", "", path) for path in leaf_keys(yaml.safe_load((CONF / "config.yaml").read_text()))]
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            tree = yaml.safe_load(path.read_text()) or {}
            rows += [(f"{group}/{path.name}", group, key[1:]) for key in leaf_keys(tree, (group,))]
    return rows


def no_default(cls_init) -> list[str]:
    return [p.name for p in inspect.signature(cls_init).parameters.values()
            if p.kind == p.KEYWORD_ONLY and p.default is not inspect.Parameter.empty]


@pytest.mark.parametrize("name", ALGOS)
def test_algo_yaml_keys_are_exactly_the_constructor_keywords(name):
    spec = yaml.safe_load((CONF / "algo" / f"{name}.yaml").read_text())
    cls = get_class(spec["_target_"])
    keys = [k for k in algorithm_keys(cls) if k not in INJECTED]
    assert sorted(k for k in spec if k != "_target_") == sorted(keys), f"conf/algo/{name}.yaml vs {cls.__name__}"
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            assert not no_default(vars(klass)["__init__"]), f"{klass.__name__} has code defaults: {no_default(vars(klass)['__init__'])}"


def test_safe_dpo_nested_groups_match_their_consumers():
    spec = yaml.safe_load((CONF / "algo" / "safe_dpo.yaml").read_text())
    lagrangian = [p.name for p in inspect.signature(LagrangeMultiplier).parameters.values() if p.kind == p.KEYWORD_ONLY]
    assert sorted(spec["lagrangian"]) == sorted(lagrangian) and not no_default(LagrangeMultiplier.__init__)
    assert sorted(spec["sampling"]) == sorted(SAMPLING_KEYS)
    assert sorted(spec["beta_scaling"]) == ["rate", "weight"]


INTERPOLATED = {m.split(".")[-1] for p in CONF.rglob("*.yaml") for m in re.findall(r"\$\{([\w.]+)\}", p.read_text())}
READ = names_read(code_files()) | INTERPOLATED  # a key another key interpolates (${output_root}) is read by Hydra


@pytest.mark.parametrize("file, group, key", config_keys(), ids=lambda v: ".".join(v) if isinstance(v, tuple) else v)
def test_every_config_key_is_read_by_the_code(file, group, key):
    name = key[-1]
    assert name in READ, f"conf/{file}: key {'.'.join(key)} is not read anywhere in src/ or train.py"


def test_no_config_read_carries_a_fallback_default():
    """`cfg.x.get("key", value)` (or getattr with a default) on a config key: the YAML already defines it."""
    keys = {path[-1] for _, _, path in config_keys()} | {k for n in ALGOS for k in
                                                         yaml.safe_load((CONF / "algo" / f"{n}.yaml").read_text())}
    offenders = []
    for path in code_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"):
                continue
            if len(node.args) == 2 and isinstance(node.args[0], ast.Constant) and node.args[0].value in keys:
                receiver = ast.unparse(node.func.value)
                if "cfg" in receiver or receiver.endswith(("trainer", "model", "peft", "data", "algo", "dist")):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "config reads with a second default:\n" + "\n".join(offenders)
