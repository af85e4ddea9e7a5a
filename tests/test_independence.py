"""Independence: the oracle never sees grpo_core, and grpo_core pulls in nothing heavy."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("numpy", "gymnasium", "transformers", "hypothesis", "adapters", "reference")


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module a Python file imports (absolute imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_reference_never_imports_grpo_core():
    """No file under reference/ imports grpo_core (not even lazily inside a function)."""
    files = sorted((ROOT / "reference").rglob("*.py"))
    assert files, "reference/ holds no Python files"
    offenders = [str(f.relative_to(ROOT)) for f in files if "grpo_core" in imported_modules(f)]
    assert offenders == []


def test_reference_oracle_uses_math_only():
    """The oracle module imports the standard library's math and nothing else."""
    assert imported_modules(ROOT / "reference" / "grpo_math.py") <= {"math", "__future__"}


def test_core_source_never_imports_forbidden_modules():
    """No non-testing file of grpo_core imports any of the forbidden packages."""
    files = [f for f in (ROOT / "grpo_core").rglob("*.py") if "testing" not in f.parts]
    for f in files:
        assert imported_modules(f).isdisjoint(FORBIDDEN), f.relative_to(ROOT)


_PROBE = r"""
import importlib, json, pkgutil, sys
import torch  # torch itself may load numpy: measure what grpo_core adds on top of it
before = set(sys.modules)
import grpo_core
names = ["grpo_core"]
for info in pkgutil.walk_packages(grpo_core.__path__, "grpo_core."):
    if info.name.split(".")[1] == "testing":
        continue
    importlib.import_module(info.name)
    names.append(info.name)
import grpo_core.testing  # the package alone must stay lazy (no hypothesis)
names.append("grpo_core.testing")
added = sorted(set(sys.modules) - before)
print(json.dumps({"imported": names, "added": added}))
"""


def test_importing_core_loads_no_forbidden_modules():
    """In a fresh interpreter, importing grpo_core, every non-testing submodule and the
    grpo_core.testing package adds none of the forbidden modules to sys.modules."""
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "grpo_core.losses" in report["imported"]
    loaded = {name.split(".")[0] for name in report["added"]}
    assert loaded.isdisjoint(FORBIDDEN), sorted(loaded & set(FORBIDDEN))


def test_testing_package_forwards_exactly_the_strategies():
    """grpo_core.testing's lazy name list matches grpo_core.testing.strategies.__all__."""
    import grpo_core.testing as kit
    from grpo_core.testing import strategies

    assert kit.STRATEGY_NAMES == set(strategies.__all__)
    assert kit.pad is strategies.pad


def test_adapters_is_this_projects_package():
    """PyPI has an unrelated distribution named ``adapters``; ours must be the one imported."""
    import adapters

    assert Path(adapters.__file__).resolve().parent == ROOT / "adapters"
    assert hasattr(__import__("adapters.cartpole").cartpole, "CartPoleAdapter")
