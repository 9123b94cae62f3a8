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
        ("selfpatch_hf.evaluation.cli", ["knn", "--help"]),
        ("selfpatch_hf.evaluation.cli", ["linear", "--help"]),
        ("selfpatch_hf.evaluation.cli", ["make-offline-data", "--help"]),
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


def _parsers():
    from selfpatch_hf.conversion.cli import build_parser as convert_parser
    from selfpatch_hf.evaluation.cli import COMMANDS, command_parser
    from selfpatch_hf.export.cli import build_parser as export_parser
    from selfpatch_hf.hub.cli import build_parser as push_parser

    parsers = {
        "selfpatch-convert": convert_parser(),
        "selfpatch-push": push_parser(),
        "selfpatch export": export_parser(),
    }
    parsers.update({f"selfpatch eval {name}": command_parser(name) for name in COMMANDS})
    return parsers


def test_help_texts_read_as_what_the_commands_do():
    """A flag never shows a default (`--no-verify ... (default: True)` reads as if both were on), the class names
    are the README's, and example paths are the ones the demo writes."""
    for name, parser in _parsers().items():
        text = parser.format_help()
        assert "(default: True)" not in text and "(default: False)" not in text, name
        assert "SelfPatchViTForPretraining" not in text, name
        assert "output/" not in text.replace("outputs/", ""), name
    convert = _parsers()["selfpatch-convert"].format_help()
    assert "written by default" in " ".join(convert.split()) and "--no-verify" in convert
    assert "selfpatch-push outputs/demo/backbone" in _parsers()["selfpatch-push"].format_help()
