#!/usr/bin/env bash
# Set up .venv and run the demo on the tiny model (CPU is fine): SFT, then the reward model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
start=$(date +%s)
.venv/bin/rlhf sft --config recipes/demo/sft.yaml "$@"
.venv/bin/rlhf reward --config recipes/demo/reward.yaml "$@"
echo "[demo] finished in $(( $(date +%s) - start ))s"
echo "[demo] SFT model:    runs/demo/sft     (manifest: runs/demo/sft/rlhf_manifest.json)"
echo "[demo] reward model: runs/demo/reward  (validation accuracy and calibration in its manifest)"
