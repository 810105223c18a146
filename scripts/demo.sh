#!/usr/bin/env bash
# Set up .venv and run the demo on the tiny model (CPU is fine): SFT for now.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
start=$(date +%s)
.venv/bin/rlhf sft --config recipes/demo/sft.yaml "$@"
echo "[demo] finished in $(( $(date +%s) - start ))s; the SFT model is in runs/demo/sft (manifest: runs/demo/sft/rlhf_manifest.json)"
