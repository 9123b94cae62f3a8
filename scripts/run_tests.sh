#!/usr/bin/env bash
# The project's test command (README, .ci/run): lint, then the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
ruff check .
ruff format --check .
# one line per test file with its dots and the share done (add -q for dots only)
python -m pytest "$@"
