"""Every command line answers `--help` without loading the heavy libraries (torch, transformers, datasets,
huggingface_hub): that is what keeps it fast. Timing itself is not asserted here (see benchmarks/)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "datasets", "huggingface_hub", "accelerate", "httpx2")

PROBE = """
import sys
from {module} import main
try:
    code = main({argv!r})
except SystemExit as exit:
    code = exit.code
print("CODE", code)
print("LOADED", " ".join(name for name in {heavy!r} if name in sys.modules))
"""


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("selfpatch_hf.cli.main", ["--help"]),
        ("selfpatch_hf.cli.main", ["export", "--help"]),
        ("selfpatch_hf.cli.main", ["push", "--help"]),
        ("selfpatch_hf.cli.main", ["convert", "--help"]),
        ("selfpatch_hf.cli.main", ["eval", "--help"]),
        ("selfpatch_hf.conversion.cli", ["--help"]),
        ("selfpatch_hf.hub.cli", ["--help"]),
        ("selfpatch_hf.export.cli", ["--help"]),
        ("selfpatch_hf.evaluation.cli", ["--help"]),
        ("selfpatch_hf.evaluation.cli", ["davis", "--help"]),
        ("selfpatch_hf.evaluation.cli", ["visualize", "--help"]),
        ("selfpatch_hf.evaluation.cli", ["linear-probe", "--help"]),
    ],
)
def test_help_loads_no_heavy_library(module, argv):
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module, argv=argv, heavy=HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line.strip() for line in done.stdout.splitlines()]
    assert "CODE 0" in lines and "usage:" in done.stdout, done.stdout + done.stderr
    assert lines[-1] == "LOADED", f"{module} {' '.join(argv)} imported {lines[-1][7:]}"
