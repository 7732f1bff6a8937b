"""The package's shape: imports flow one way between stage subpackages, and the analysis needs no jax."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.quick

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "psych201_jax"
BASE = (
    "types",
    "conditions",
    "errors",
    "hashing",
    "locks",
    "defaults",
    "console",
    "torch_pickle",
    "paths",
)  # shared vocabulary, imported by every stage
# Stage order: a module may import its own stage, BASE and earlier stages only.
STAGES = ("data", "model", "parallel", "scoring", "sampling", "runs", "cli")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        yield ".".join(parts), path


def _imports(path: pathlib.Path) -> set[str]:
    """psych201_jax modules (and packages) imported anywhere in the file, relative to the package."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "psych201_jax":
            base = node.module.split(".")[1:]
            for alias in node.names:
                out.add(".".join(base + [alias.name]) if base else alias.name)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("psych201_jax."))
    return out


def _third_party(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
    return out


def _top(name: str) -> str:
    return name.split(".")[0]


def _allowed(module: str, target: str) -> bool:
    """Whether ``module`` may import ``target`` (both relative to the package)."""
    stage, dest = _top(module), _top(target)
    if dest in BASE:
        return True
    if stage in BASE or module == "runs.store":  # the store is read by the analysis: base types only
        return False
    if stage == "testing":
        return True
    if dest == "testing":
        return False
    if stage == "analysis":
        return dest == "analysis" or target == "runs.store"
    if stage == "cli":
        return True
    return dest in STAGES and STAGES.index(dest) <= STAGES.index(stage)


def test_imports_flow_one_way():
    wrong = []
    for module, path in _modules():
        for target in _imports(path):
            if not _allowed(module, target):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_upward_imports():
    """The checker itself can fail: an upward or sideways import is reported."""
    assert not _allowed("data.spans", "model.checkpoint")
    assert not _allowed("scoring.scorer", "runs.job")
    assert not _allowed("analysis.report", "scoring.stream")
    assert not _allowed("runs.store", "scoring.scorer")
    assert not _allowed("types", "data.records")
    assert not _allowed("runs.job", "testing.tiny_models")
    assert not _allowed("sampling.sampler", "runs.store") and not _allowed("scoring.scorer", "sampling.slots")
    assert _allowed("runs.job", "scoring.stream") and _allowed("analysis.report", "runs.store")
    assert _allowed("sampling.sampler", "scoring.packing") and _allowed("sampling.slots", "model.decoder")


def test_only_testing_imports_torch():
    """Legacy .bin checkpoints and the study's .pth files are read by torch_pickle, without torch."""
    users = [module for module, path in _modules() if "torch" in _third_party(path) and _top(module) != "testing"]
    assert not users, users


@pytest.mark.parametrize(
    "module",
    ["psych201_jax.analysis.report", "psych201_jax.runs.store", "psych201_jax.cli.analyze", "psych201_jax.cli.export"],
)
def test_analysis_and_store_import_no_jax(module):
    code = (
        f"import sys, {module}; heavy = sorted(m for m in ('jax', 'flax', 'torch', 'transformers') "
        f"if m in sys.modules); assert not heavy, heavy"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
