"""What the package imports is declared, the declared set is consistent (``pip check``), and ``requirements.lock``
pins every declared dependency to one version (``make lock`` writes it from the tested environment)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "platform" / "drugprot"


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {_name(r) for r in requirements}


def imported_modules() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"drugprot", "__future__"}


def test_every_imported_package_is_declared():
    owners = packages_distributions()
    undeclared = {}
    for module in sorted(imported_modules()):
        distributions = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
        if not distributions & declared():
            undeclared[module] = sorted(distributions)
    assert not undeclared, f"imported but not in pyproject.toml: {undeclared}"


def test_the_environment_has_no_broken_requirements():
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_lock_pins_every_declared_dependency_once():
    lines = [line for line in (REPO / "requirements.lock").read_text().splitlines() if line and not line.startswith("#")]
    pins = dict(line.split("==", 1) for line in lines)
    assert len(pins) == len(lines) and all(re.fullmatch(r"[A-Za-z0-9._-]+==[^=\s]+", line) for line in lines)
    locked = {name.lower().replace("_", "-") for name in pins}
    assert declared() - {"drugprot"} <= locked, f"declared but not locked: {declared() - locked}"
    constraints = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                       if "==" in line and not line.startswith("#"))
    assert pins["torch"] == constraints["torch"] and "+" not in pins["torch"]  # the CPU build comes from make's first step
