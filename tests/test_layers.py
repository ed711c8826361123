"""The house's layering, kept true: the import graph of `gemma_eqx` and `interp` (every import,
function-level ones included) has no cycle, every arrow between layers points the way
`docs/architecture.md` draws it, `gemma_eqx` imports nothing of `interp` (statically, and in a
fresh interpreter where `interp` cannot be imported), and the module paths of 0.1 still import
the modules at their new homes."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SRC = ROOT / "src"
PACKAGES = ("gemma_eqx", "interp")


def _modules() -> dict[str, Path]:
    """`{dotted name: file}` for every module of both packages (a package by its __init__)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((SRC / package).rglob("*.py")):
            parts = list(path.relative_to(SRC).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, level: int, target: str | None, is_package: bool) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """`{module: modules it imports}` within the two packages, read from the source."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        edges = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, node.level, node.module, is_package)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in MODULES and "." in target:
                    target = target.rsplit(".", 1)[0]  # a name inside a module
                if target in MODULES and target != name:
                    edges.add(target)
                elif target.split(".")[0] in PACKAGES and target not in MODULES:
                    edges.add(target)  # a path that does not exist: reported below
        graph[name] = edges
    return graph


GRAPH = import_graph()


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_names_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_sources_import_only_modules_that_exist_at_their_homes():
    from gemma_eqx._aliases import MOVED

    old = {f"gemma_eqx.{name}" for name in MOVED}
    bad = sorted((m, t) for m, ts in GRAPH.items() for t in ts if t not in MODULES or t in old)
    assert not bad, f"imports of missing or old module paths: {bad}"


def layers_drawn() -> dict[str, set[str]]:
    """The table of docs/architecture.md between `<!-- layers -->` markers:
    `layer -> layers it may import` (one per line)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- layers -->\n```\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no layer table"
    allowed = {}
    for line in block.group(1).strip().splitlines():
        layer, _, may = line.partition("->")
        allowed[layer.strip()] = {x.strip() for x in may.replace("(nothing)", "").split(",")
                                  if x.strip()}
    return allowed


def layer_of(module: str, allowed: dict[str, set[str]]) -> str:
    """The longest layer name of the table that `module` is in (`gemma_eqx.model.sites` is
    in `gemma_eqx.model`)."""
    candidates = [la for la in allowed if module == la or module.startswith(la + ".")]
    assert candidates, f"{module} is in no layer of docs/architecture.md"
    return max(candidates, key=len)


def test_every_arrow_points_the_way_the_architecture_notes_draw():
    allowed = layers_drawn()
    wrong = []
    for module, targets in GRAPH.items():
        here = layer_of(module, allowed)
        for target in targets:
            there = layer_of(target, allowed)
            if there != here and there not in allowed[here]:
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert not wrong, "arrows against the drawing:\n" + "\n".join(sorted(wrong))


def test_gemma_eqx_imports_nothing_of_interp():
    up = sorted(f"{m} -> {t}" for m, ts in GRAPH.items() for t in ts
                if m.startswith("gemma_eqx") and t.startswith("interp"))
    assert not up, up


BLOCKED = """
import importlib, json, pkgutil, sys

class NoInterp:
    def find_spec(self, name, path=None, target=None):
        if name == "interp" or name.startswith("interp."):
            raise ImportError(f"{name} is made unimportable for this test")

sys.meta_path.insert(0, NoInterp())
import gemma_eqx
names = [m.name for m in pkgutil.walk_packages(gemma_eqx.__path__, "gemma_eqx.")]
failed = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {e}"
from gemma_eqx.cli import build_parser, main
commands = sorted(build_parser()._subparsers._group_actions[0].choices)
code = main(["induction"])
print(json.dumps({"names": names, "failed": failed, "commands": commands, "code": code,
                  "interp": [m for m in sys.modules if m.split(".")[0] == "interp"]}))
"""


def test_every_gemma_eqx_module_imports_with_interp_unimportable():
    run = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(got["names"]) >= 25 and not got["failed"], got["failed"]
    assert got["interp"] == []
    # The base command still offers its own commands; interp's show up as unavailable.
    assert {"generate", "launch", "induction", "tutorial"} <= set(got["commands"])
    assert got["code"] == 2
    assert "gemma-eqx induction: error: this command is not available here: " \
           "interp.cli:add_induction_command cannot be imported" in run.stderr


@pytest.mark.parametrize("old, new", [
    ("checkpoint", "formats.kaggle"), ("sharding", "parallel.sharding"),
    ("hf", "formats.hf"), ("runtime", "core.runtime"), ("display", "model.display"),
    ("throughput", "parallel.throughput"), ("weights", "model.weights"),
])
def test_the_flat_paths_of_0_1_import_the_modules_at_their_new_homes(old, new):
    import importlib

    moved = importlib.import_module(f"gemma_eqx.{old}")
    assert moved is importlib.import_module(f"gemma_eqx.{new}")
    assert moved.__spec__.name == f"gemma_eqx.{new}"
    exec(f"from gemma_eqx.{old} import *", {})  # noqa: S102 - the old star-import works too


def test_every_old_path_has_a_home():
    from gemma_eqx._aliases import MOVED

    assert all(f"gemma_eqx.{new}" in MODULES for new in MOVED.values())
    assert not any(f"gemma_eqx.{old}" in MODULES for old in MOVED)
