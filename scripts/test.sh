#!/usr/bin/env bash
# Set up .venv and run the whole test suite (unit, recipe and 2-process DeepSpeed tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout 900 "$@"
