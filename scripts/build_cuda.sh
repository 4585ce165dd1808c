#!/usr/bin/env bash
# Compile pyllama with CUDA into a wheel: a check that the CUDA build still compiles, on a machine
# with the CUDA toolkit's nvcc, with or without a GPU and its driver. cuBLAS comes from PyPI's
# nvidia-cublas wheel when the toolkit lacks it. Not part of the CI run (it takes long on 2 cores).
#
#   scripts/build_cuda.sh [ARCHITECTURES]     # default 90; e.g. "80;86;89;90", or "native" on a GPU machine
#
# The wheel goes to dist/, the build to build/cuda/ (kept: a second run rebuilds only what changed).
set -euo pipefail
cd "$(dirname "$0")/.."
archs="${1:-90}"
work="build/cuda-deps"
mkdir -p "$work" dist

command -v nvcc >/dev/null || { echo "build_cuda: nvcc is not on PATH (install the CUDA toolkit)" >&2; exit 1; }
cuda_major="$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
cuda_root="$(dirname "$(dirname "$(command -v nvcc)")")"
echo "build_cuda: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') in $cuda_root, architectures $archs"

args=(-DGGML_CUDA=on "-DCMAKE_CUDA_ARCHITECTURES=$archs" -DPYLLAMA_TEST_TOOLS=OFF)
# Without a driver (libcuda) the build cannot use CUDA's virtual memory management.
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so'; then
    args+=(-DGGML_CUDA_NO_VMM=ON)
fi
# cuBLAS: the toolkit's, else the nvidia-cublas wheel matching nvcc's major version.
if ! ls "$cuda_root"/lib64/libcublas.so* >/dev/null 2>&1 && ! ls "$cuda_root"/targets/*/lib/libcublas.so* >/dev/null 2>&1; then
    if [ "$cuda_major" -ge 13 ]; then pkg="nvidia-cublas==${cuda_major}.*"; sub="cu${cuda_major}"; else pkg="nvidia-cublas-cu${cuda_major}"; sub=""; fi
    python -m pip download --quiet --no-deps --only-binary=:all: -d "$work" "$pkg"
    rm -rf "$work/cublas" && mkdir -p "$work/cublas"
    python -m zipfile -e "$(ls -t "$work"/nvidia_cublas*.whl | head -1)" "$work/cublas"
    base="$(cd "$work/cublas/nvidia" && pwd)/${sub:-cublas}"
    [ -d "$base/include" ] || base="$(dirname "$(find "$work/cublas" -name cublas_v2.h | head -1)")/.."
    inc="$(cd "$base/include" && pwd)"
    lib="$(cd "$base/lib" && pwd)"
    echo "build_cuda: cuBLAS from $(basename "$(ls -t "$work"/nvidia_cublas*.whl | head -1)")"
    args+=("-DCUDA_cublas_LIBRARY=$(ls "$lib"/libcublas.so.* | head -1)"
           "-DCUDA_cublasLt_LIBRARY=$(ls "$lib"/libcublasLt.so.* | head -1)"
           "-DCMAKE_CUDA_FLAGS=-I$inc" "-DCMAKE_CXX_FLAGS=-I$inc")
fi

start=$(date +%s)
CMAKE_ARGS="${args[*]}" python -m pip wheel --no-deps --no-build-isolation -w dist -C build-dir=build/cuda .
echo "build_cuda: built in $(( $(date +%s) - start )) s: $(ls -t dist/pyllama-*.whl | head -1)"
