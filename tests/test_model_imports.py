"""Models stand apart from the pipeline: what importing a model module runs (its module-level imports, followed
transitively; lazy imports inside functions are not run on import) holds no stage registry, lineage, launcher or
stage entry point, and the vqvae and prior packages do not import each other both ways."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from helpers import REPO

FIRST_PARTY = ("runtime", "shards", "vqvae", "prior", "judge", "launch", "bench")
MODEL_MODULES = ("vqvae.models", "vqvae.blocks", "vqvae.discriminator", "vqvae.metrics", "vqvae.config",
                 "vqvae.quantizers", "vqvae.quantizers.codebook", "vqvae.quantizers.fsq", "prior.models",
                 "prior.base", "prior.gated", "prior.masked", "prior.transformer", "prior.config", "judge.classifier",
                 "judge.config")
PIPELINE = ("runtime.lineage", "runtime.stages", "runtime.trainer", "runtime.cli", "runtime.integrity", "launch",
            "vqvae.train", "vqvae.encode", "prior.train", "prior.sample", "judge.train", "judge.evaluate",
            "shards.stage")


def _source(module: str) -> Path:
    path = REPO / (module.replace(".", "/") + ".py")
    return path if path.is_file() else REPO / module.replace(".", "/") / "__init__.py"


def _run_on_import(tree: ast.AST) -> Iterator[ast.AST]:
    for node in ast.iter_child_nodes(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node
            yield from _run_on_import(node)


def imported(module: str) -> set[str]:
    """First-party modules ``module`` imports when it is imported (with the packages above them)."""
    found: set[str] = set()
    for node in _run_on_import(ast.parse(_source(module).read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] in FIRST_PARTY:
                found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return found


def closure(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        for name in imported(todo.pop()) - seen:
            seen.add(name)
            todo.append(name)
    return seen


def test_model_modules_import_no_pipeline_module() -> None:
    for module in MODEL_MODULES:
        pipeline = sorted(name for name in closure(module) if name.startswith(PIPELINE))
        assert not pipeline, f"{module} imports {pipeline}"


def test_vqvae_and_prior_do_not_import_each_other_both_ways() -> None:
    def imports_package(package: str, other: str) -> list[str]:
        modules = [".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                   for p in (REPO / package).rglob("*.py")]
        return [m for m in modules if any(name.split(".")[0] == other for name in imported(m))]

    assert not imports_package("vqvae", "prior")  # prior/api.py and prior/sample.py use the tokenizer: one way


def test_the_check_sees_an_import() -> None:
    assert "runtime.stages" in closure("runtime.lineage") and "vqvae.models" in closure("prior.sample")
