"""The house rules of the package, checked on its source: every module opens with a docstring that says
its job, and no function is longer than 60 lines (split it by responsibility instead)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "safespace"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 60


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_says_its_job(path):
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert path.name == "__main__.py" or (doc and len(doc.split()) >= 5), f"{path.name}: no opening docstring"


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "split these functions: " + "; ".join(long)
