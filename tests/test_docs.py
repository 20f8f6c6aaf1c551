"""The docs say what the code does: the README's layout table names every file the layout defines, and the
key lists written in docs/architecture.md are the schema's. (docs/commands.md and docs/config.md are generated
or checked verbatim in tests/test_cli.py and tests/test_config.py.)"""
from __future__ import annotations

import ast
import re

from conftest import REPO
from pipeline.core.config import schema
from pipeline.core.files import layout


def _readme_layout_block() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## On-disk layout")
    block = text[start:]
    a = block.index("```")
    return block[a:block.index("```", a + 3)]


def test_the_readme_layout_table_names_every_file_and_folder_the_layout_defines():
    block = _readme_layout_block()
    tree = ast.parse((REPO / "pipeline" / "core" / "files" / "layout.py").read_text())
    names = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and re.fullmatch(r"[a-z_]+\.(json|npz|csv|md|safetensors|pt|yaml|onnx)", n.value)}
    assert len(names) > 15
    missing = sorted(n for n in names if n not in block)
    assert not missing, f"README's layout table does not name {missing}"
    for folder in (layout.FOLDS, layout.RUNS, layout.SUBMISSIONS, layout.REPORTS, layout.EXPORTS, layout.CACHE,
                   layout.STATS):
        assert f"{folder}/" in block, folder


def test_architecture_lists_the_data_keys_that_do_not_retrain_as_the_schema_says():
    """Stage 2's row of the up-to-date table names the `data` keys of stage setup, 4, 5 or none."""
    text = (REPO / "docs" / "architecture.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 2 train"))
    listed = set(re.findall(r"`([a-z_*]+)`", row.split("(not its keys of stage setup, 4, 5 or none:")[1].split(")")[0]))
    want = {k.name.split(".", 1)[1] for k in schema() if k.name.startswith("data.") and k.stage in ("setup", "4", "5", "-")}
    grouped = {w for w in want if not any(x.endswith("*") and w.startswith(x[:-1]) for x in listed)}
    assert grouped == {x for x in listed if not x.endswith("*")}, (sorted(want), sorted(listed))
