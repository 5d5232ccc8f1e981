"""docs/reliability.md promises a test for every fault: each test it names must exist (the suite runs it)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMED_TEST = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def test_every_row_of_the_reliability_table_names_tests_that_exist():
    rows = [line for line in (ROOT / "docs" / "reliability.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| fault", "|---"))]
    assert len(rows) >= 25
    for row in rows:
        named = NAMED_TEST.findall(row)
        assert named, f"a row names no test: {row[:80]}"
        for module, name in named:
            tree = ast.parse((ROOT / module).read_text())
            functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
            assert name in functions, f"{module}::{name} named in docs/reliability.md does not exist"
