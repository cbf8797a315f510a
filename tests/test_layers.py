"""The layering of ../shared/DESIGN.md holds: imports run one way, and the lower layers load
without the stages above them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_in_pyproject_are_kept():
    pytest.importorskip("importlinter")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout and "KEPT" in result.stdout


@pytest.mark.parametrize(
    "modules",
    ["medsight.data, medsight.models", "medsight.config, medsight.runs", "medsight.inference"],
)
def test_lower_layers_import_nothing_from_the_stages_above(modules):
    above = ("training", "serving", "evaluation", "explain", "workflows", "cli")
    if modules != "medsight.inference":
        above += ("inference",)
    code = (
        f"import json, sys, {modules}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('medsight.'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    leaked = [m for m in loaded if m.split(".")[1] in above]
    assert leaked == [], f"import {modules} also loaded {leaked}"
