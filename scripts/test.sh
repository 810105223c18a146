#!/usr/bin/env bash
# Set up .venv, lint (ruff) and run the whole test suite (unit, recipe, 2-process DeepSpeed,
# pipeline, and the labelling app's browser / load / crash / PostgreSQL tests).
set -euo pipefail
cd "$(dirname "$0")/.."
# `--fast`: the fast tier (about a minute): unit tests and the stage runs that need no trained
# checkpoint; no launcher, no servers under load, no training fixture
# (tests/conftest.py). Anything else is passed to pytest as it is.
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not slow and not distributed" "$@"
fi
bash scripts/setup.sh
# The labelling app's tests drive Debian's chromium (Playwright, no browser download) and start a
# throwaway PostgreSQL. As root (CI, a fresh machine) we install them; otherwise those tests skip.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[test] installing ${missing[*]} for the labelling app's tests"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null \
    || echo "[test] could not install ${missing[*]}; those tests will be skipped"
fi
# Lint and format check first (a few seconds): configured in pyproject.toml's [tool.ruff].
echo "[test] ruff check and ruff format --check"
.venv/bin/ruff check rlhf tests scripts
.venv/bin/ruff format --check --quiet rlhf tests scripts
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout 900 "$@"
