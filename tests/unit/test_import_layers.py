"""The pure packages import nothing from ``gateway/`` (docs/ARCHITECTURE.md): parsing, mapping, DUO
evaluation and model code stay usable and testable without the server, its store or its settings."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PURE = ("mappings", "ontologies", "inference")


def gateway_imports(path: Path) -> list[str]:
    """``module:line`` of every import of ``gateway`` (or a submodule) in a Python file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{n}:{node.lineno}" for n in names if n == "gateway" or n.startswith("gateway.")]
    return found


@pytest.mark.parametrize("package", PURE)
def test_pure_package_imports_nothing_from_gateway(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    offenders = {p.relative_to(REPO).as_posix(): imps for p in files if (imps := gateway_imports(p))}
    assert not offenders, f"{package}/ must not import gateway: {offenders}"


def test_the_scanner_finds_an_import(tmp_path):
    """The check is able to fail: top-level, nested and from-imports of gateway are all found."""
    p = tmp_path / "m.py"
    p.write_text("import os\nimport gateway.store\ndef f():\n    from gateway import keys\n"
                 "from gateway_other import x\nfrom . import gateway\n")
    assert gateway_imports(p) == ["gateway.store:2", "gateway:4"]
