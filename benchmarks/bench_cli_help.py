"""Wall time of every command line's `--help` (BENCHMARKS.md's goal: well under 1.5 s, so the tools feel instant).

    python benchmarks/bench_cli_help.py [--repeats 5]

Each command runs in a fresh interpreter (`python -m MODULE ARGS --help`), as a user's shell would start it; the
median and the slowest of the repeats are printed as a Markdown table. `--help` stays fast because no command
imports torch, transformers, datasets or huggingface_hub before it has parsed its arguments (checked by
tests/test_command_line_help.py), except the training scripts, which parse with transformers' public
`HfArgumentParser` and so import the `transformers` package (not torch; tests/test_training_components.py).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = [
    ("selfpatch", ["selfpatch_hf.cli.main", "--help"]),
    ("selfpatch export", ["selfpatch_hf.cli.main", "export", "--help"]),
    ("selfpatch-convert", ["selfpatch_hf.conversion", "--help"]),
    ("selfpatch-push", ["selfpatch_hf.hub", "--help"]),
    ("selfpatch eval", ["selfpatch_hf.evaluation", "--help"]),
    ("selfpatch eval davis", ["selfpatch_hf.evaluation", "davis", "--help"]),
    ("selfpatch eval visualize", ["selfpatch_hf.evaluation", "visualize", "--help"]),
    ("training/pretrain.py", None),
    ("training/finetune_segmentation.py", None),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (default: 5)")
    args = parser.parse_args()
    print("| command | median s | slowest s |\n|---|---|---|")
    for name, module_args in COMMANDS:
        argv = (
            [sys.executable, name, "--help"] if module_args is None else [sys.executable, "-m", *module_args]
        )
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        print(f"| `{name} --help` | {statistics.median(times):.2f} | {max(times):.2f} |")


if __name__ == "__main__":
    main()
