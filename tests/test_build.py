"""What the build must deliver: one self-contained extension module, exporting only its init
function, with no AMX instructions unless asked for."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import pyllama
from pyllama import _core

SO = Path(_core.__file__)


def native_files() -> list[Path]:
    pkg = SO.parent
    return sorted(p for p in pkg.rglob("*") if p.suffix in (".so", ".dylib", ".dll", ".pyd") or ".so." in p.name)


def test_one_extension_and_no_loose_libraries() -> None:
    """A default build is one module; a portable one (PYLLAMA_PORTABLE) adds llama.cpp's libraries,
    renamed pyllama-*, and ggml's loadable backends: the CPU variants but the AMX one, and RPC."""
    native = [p.name for p in native_files()]
    assert (SO.parent / "licenses" / "llama.cpp-LICENSE").is_file()
    if not _core.PORTABLE:
        assert native == [SO.name]
        return
    assert SO.name in native
    libs = {n.split(".so")[0] for n in native if n != SO.name}
    assert {"libpyllama-llama", "libpyllama-ggml", "libpyllama-ggml-base", "libggml-rpc"} <= libs
    variants = {n.removeprefix("libggml-cpu-") for n in libs if n.startswith("libggml-cpu-")}
    assert "sapphirerapids" not in variants  # AMX faults on some CPUs that advertise it
    assert {"sse42", "haswell", "skylakex"} <= variants or {"armv8.0_1"} <= variants
    ours = {"libpyllama-llama", "libpyllama-llama-common", "libpyllama-mtmd", "libpyllama-ggml", "libpyllama-ggml-base"}
    assert all(n in ours or n.startswith("libggml-cpu-") or n == "libggml-rpc" for n in libs), libs


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm is not installed")
def test_only_the_init_symbol_is_exported() -> None:
    out = subprocess.run(["nm", "-D", "--defined-only", str(SO)], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert exported == {"PyInit__core"}


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump is not installed")
def test_no_amx_instructions_in_a_default_build() -> None:
    """AMX faults on some CPUs that advertise it; a default build must not contain AMX code."""
    amx = ("tilezero", "ldtilecfg", "sttilecfg", "tileloadd", "tdpbssd", "tdpbf16ps", "tilerelease")
    for lib in native_files():
        proc = subprocess.Popen(["objdump", "-d", "--no-show-raw-insn", str(lib)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        hits = [line.strip() for line in proc.stdout if any(f"\t{m}" in line or f" {m} " in line for m in amx)]
        proc.wait()
        assert proc.returncode == 0
        assert hits == [], (lib.name, hits[:5])


def test_extension_reports_its_llama_cpp_commit() -> None:
    assert pyllama.LLAMA_CPP_COMMIT == "4df29be4f4c3673f428170fda944a5b19f743bb8"
