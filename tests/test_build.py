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


def test_one_extension_and_no_loose_libraries() -> None:
    pkg = SO.parent
    native = [p.name for p in pkg.rglob("*") if p.suffix in (".so", ".dylib", ".dll", ".pyd") or ".so." in p.name]
    assert native == [SO.name]
    assert (pkg / "licenses" / "llama.cpp-LICENSE").is_file()


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm is not installed")
def test_only_the_init_symbol_is_exported() -> None:
    out = subprocess.run(["nm", "-D", "--defined-only", str(SO)], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert exported == {"PyInit__core"}


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump is not installed")
def test_no_amx_instructions_in_a_default_build() -> None:
    """AMX faults on some CPUs that advertise it; a default build must not contain AMX code."""
    proc = subprocess.Popen(["objdump", "-d", "--no-show-raw-insn", str(SO)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    amx = ("tilezero", "ldtilecfg", "sttilecfg", "tileloadd", "tdpbssd", "tdpbf16ps", "tilerelease")
    hits = [line.strip() for line in proc.stdout if any(f"\t{m}" in line or f" {m} " in line for m in amx)]
    proc.wait()
    assert proc.returncode == 0
    assert hits == [], hits[:5]


def test_extension_reports_its_llama_cpp_commit() -> None:
    assert pyllama.LLAMA_CPP_COMMIT == "4df29be4f4c3673f428170fda944a5b19f743bb8"
