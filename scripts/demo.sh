#!/usr/bin/env bash
# Set up .venv and run the whole demo pipeline on the tiny model (CPU is fine):
# SFT -> reward model -> PPO -> evaluation report. Rerunning skips finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
start=$(date +%s)
.venv/bin/rlhf pipeline --config recipes/demo/pipeline.yaml "$@"
echo "[demo] finished in $(( $(date +%s) - start ))s"
echo "[demo] models: runs/demo/{sft,reward,ppo}   report: runs/demo/eval/report.md"
