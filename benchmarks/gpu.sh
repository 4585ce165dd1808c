#!/usr/bin/env bash
# The whole GPU check in one run, on a machine with an NVIDIA GPU (an H100 or H200, say) and the CUDA
# toolkit: pyllama built with CUDA for that GPU, its tests with every layer offloaded (greedy tokens
# equal to the CPU run up to near-ties, the engine with 8 sequences: tests/test_gpu.py), then
# llama-bench against pyllama's prompt and decode speed and llama-server against `pyllama serve` at
# 8 clients, all on that GPU, with llama.cpp's tools built from vendor/llama.cpp with CUDA as well.
#
#   benchmarks/gpu.sh [ARCHITECTURES]      # default: native (this machine's GPU)
#
# Results: benchmarks/.work/results-gpu.json and docs/benchmarks-gpu.md (the sections speed and server;
# docs/benchmarks.md, the CPU figures, is left as it is), and the test log in
# benchmarks/.work/gpu-tests.log.
set -euo pipefail
cd "$(dirname "$0")/.."
archs="${1:-native}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || {
    echo "gpu.sh: no NVIDIA GPU here (nvidia-smi failed)" >&2
    exit 1
}
mkdir -p benchmarks/.work

# 1. pyllama with CUDA, into a virtual environment of its own
scripts/build_cuda.sh "$archs"
venv=benchmarks/.work/venv-cuda
python -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet "$(ls -t dist/pyllama-*.whl | head -1)[test,bench]"
"$venv/bin/python" -c "import pyllama; print(pyllama.system_info()); print(pyllama.devices())"

# 2. the tests, every layer offloaded (Llama's and Model's default), and the GPU's own tests
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_engine.py tests/test_llama.py \
    tests/test_llama_state.py tests/test_server.py 2>&1 | tee benchmarks/.work/gpu-tests.log

# 3. llama.cpp's tools with CUDA (their own build directory), and the speed and server sections
export PYLLAMA_BENCH_CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$archs"
"$venv/bin/python" benchmarks/run.py --only speed,server --levels 8 --no-llama-cpp-python --reps 5 \
    --results benchmarks/.work/results-gpu.json --doc docs/benchmarks-gpu.md
