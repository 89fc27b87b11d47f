"""How the full suite is split over pytest-xdist workers (tests/conftest.py): a module's tests stay together, so
its module fixtures are made once, and every Slurm test is in one scope, so two never compete for the two nodes."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import SLURM_MODULES, scope_of

TESTS = Path(__file__).resolve().parent


def test_a_module_is_one_scope_whatever_its_parameters() -> None:
    assert scope_of("tests/test_lineage.py::test_a") == scope_of("tests/test_lineage.py::test_b[x::y]") == \
        "tests/test_lineage.py"
    assert scope_of("tests/test_lineage.py::test_a") != scope_of("tests/test_trainer.py::test_a")


def test_every_slurm_module_is_the_one_slurm_scope() -> None:
    assert {scope_of(f"{module}::test_x") for module in SLURM_MODULES} == {"slurm"}


def test_slurm_modules_are_the_modules_that_use_the_marker() -> None:
    """Read from the sources, so a module that stops using Slurm leaves the list too."""
    using = set()
    for path in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "slurm" and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "mark":
                using.add(f"tests/{path.name}")
    assert using == SLURM_MODULES
