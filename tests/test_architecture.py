"""The house rules, read from the code: core imports no stage, tool or CLI; a stage imports no other
stage and no tool; tools use core (stages only through their files); no import loops; every path of
the on-disk layout is spelled in core/files/layout.py alone."""
from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pipeline"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every pipeline module a file imports (function-level imports included)."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pipeline")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("pipeline"):
                continue
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}  # `from ..core import models`
    known = {_module(p) for p in PKG.rglob("*.py")}
    return {m for m in out if m in known} - {mod}


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in PKG.rglob("*.py")}


def _wing(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ("core", "stages", "tools") else "top"


def test_wings_import_only_what_the_rules_allow():
    bad = []
    for mod, deps in _graph().items():
        wing = _wing(mod)
        for d in deps:
            w = _wing(d)
            if wing == "core" and w != "core":
                bad.append(f"{mod} (core) imports {d}")
            if wing == "stages" and (w in ("tools", "top") or (w == "stages" and d != "pipeline.stages")):
                bad.append(f"{mod} (a stage) imports {d}")
            if wing == "tools" and w == "stages":
                bad.append(f"{mod} (a tool) imports the stage {d}: tools read stages' files")
    assert not bad, "\n".join(bad)


def test_no_import_loops():
    graph = _graph()
    state: dict[str, int] = {}
    loops = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                loops.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    # a package's __init__ importing nothing of its children makes parent -> child edges harmless
    assert not loops, loops


def test_the_three_wings_hold_the_modules_readme_names():
    names = {w: sorted(str(p.relative_to(PKG / w).with_suffix("")) for p in (PKG / w).rglob("*.py")
                       if p.stem != "__init__") for w in ("core", "stages", "tools")}
    assert names["stages"] == ["ensemble", "folds", "infer", "rebalance", "train"]
    assert {"config", "errors", "files/layout", "files/provenance", "inputs/images", "nets/models", "predict/metrics",
            "files/artifacts", "engine/loop"} <= set(names["core"])
    assert {"reports/leaderboard", "reports/experiment_page", "reports/score_table", "selfcheck", "demo"} <= set(names["tools"])
    assert sorted(p.name for p in PKG.glob("*.py")) == ["__init__.py", "__main__.py", "cli.py"]


def test_every_folder_is_small_enough_to_read_in_one_look():
    """No package holds more than 12 modules, and each core subpackage names its modules in its __init__."""
    for folder in [PKG, *(p for p in PKG.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        mods = [p.stem for p in folder.glob("*.py") if p.stem != "__init__"]
        assert len(mods) <= 12, (folder, len(mods))
        if folder.parent == PKG / "core":
            doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
            assert all(f"`{m}`" in doc for m in mods), (folder, [m for m in mods if f"`{m}`" not in doc])


def test_layout_paths_are_spelled_once():
    """File names of the layout appear as string literals in core/files/layout.py only."""
    names = re.compile(r"""["'](summary\.json|model\.safetensors|oof\.npz|test\.npz|history\.csv|last\.pt|"""
                       r"""classes\.json|config\.yaml|features\.(npz|json)|leaderboard\.(csv|md)|report\.(csv|md)|"""
                       r"""index\.md)["']|Path\(["'](runs|folds|submissions|reports)["']\)|"""
                       r"""/ ["'](runs|folds|submissions|reports)["']|["'](runs|folds|submissions|reports)/""")
    offenders = []
    for p in PKG.rglob("*.py"):
        if p.name == "layout.py":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if names.search(code.split('"""')[0]) and "write:" not in code:
                offenders.append(f"{p.relative_to(PKG)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_numeric_modules_take_no_config():
    """loop, heads, metrics, images, augment, models, tta, losses, samplers take sections or values, never the
    whole Config (benchmarks/config_edges.py counts the rest)."""
    numeric = {"loop", "heads", "metrics", "images", "augment", "models", "tta", "losses", "samplers"}
    bad = []
    for p in (PKG / "core").rglob("*.py"):
        if p.stem not in numeric:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for a in node.args.args + node.args.kwonlyargs:
                    ann = ast.unparse(a.annotation).strip("\"'") if a.annotation else ""
                    if ann == "Config" or (a.arg in ("cfg", "mcfg") and not ann):
                        bad.append(f"{p.relative_to(PKG)}:{node.name}")
    assert not bad, bad


# the functions allowed to take the whole Config (or a list of them): docs/architecture.md "The config at the edges"
CONFIG_EDGES = {
    # a stage's entry points, and the one place each resolves what its steps read (Job.of) or reads its inputs
    *(f"stages/{s}.py:{f}" for s in ("folds", "train", "rebalance", "infer", "ensemble") for f in ("run", "status")),
    "stages/train.py:of", "stages/rebalance.py:of", "stages/infer.py:of", "stages/infer.py:load_inputs",
    # the command line: each command's handler and the dispatch to a stage's run/status
    *(f"cli.py:cmd_{c}" for c in ("cache", "export", "lr_find", "doctor", "all", "status", "stage", "clean")),
    "cli.py:cmd_sweep", "cli.py:run_stage", "cli.py:run_all", "cli.py:print_status",
    # tools' entry points, and the plan, which checks whole configs
    "tools/doctor.py:main", "tools/doctor.py:of", "tools/export.py:run", "tools/lr_find.py:run",
    "tools/sweep.py:run", "tools/sweep.py:of",
    "tools/plan.py:_configs", "tools/plan.py:_check_data", "tools/plan.py:build", "tools/plan.py:check",
    # what turns a config into data: serialisers, validation, resolved pixels, trackers
    # the declarations of an experiment's units (#46): each unit's record, deps and refusals, from its config
    "core/files/units.py:experiment_units",
    "tools/export.py:bundle_member_config",
    "core/config.py:__init__",
    "core/inputs/pixels.py:pixels", "core/report/tracking.py:of",
}


def test_the_whole_config_stops_at_the_edges():
    """Every function taking the whole Config is an edge listed above; everything below takes a section, a resolved
    object (Pixels, Loading, a stage's Job) or values. A new function that needs the config: pass it what it reads."""
    found = set()
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for a in node.args.args + node.args.kwonlyargs:
                    ann = ast.unparse(a.annotation).strip("\"'") if a.annotation else ""
                    if re.search(r"\bConfig\b", ann) or (a.arg in ("cfg", "mcfg") and not ann):
                        found.add(f"{p.relative_to(PKG)}:{node.name}")
    assert not found - CONFIG_EDGES, f"take a section or values instead of the config: {sorted(found - CONFIG_EDGES)}"
    assert len(found) <= 41
