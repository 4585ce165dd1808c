#!/usr/bin/env python3
"""Fill ``vendor/llama.cpp`` with the pinned llama.cpp sources.

It first tries ``git submodule update --init`` (the normal way). Where git cannot reach GitHub, it takes
the identical copy of llama.cpp that ships inside the PyPI sdist of ``llama-cpp-python==0.3.35``:
it downloads the sdist with pip (or uses one given with ``--sdist``), checks its sha256 before
extracting anything, and extracts only ``vendor/llama.cpp``. Running it again when the directory
is already filled does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PIN_COMMIT = "4df29be4f4c3673f428170fda944a5b19f743bb8"
SDIST_REQUIREMENT = "llama-cpp-python==0.3.35"
SDIST_NAME = "llama_cpp_python-0.3.35.tar.gz"
SDIST_SHA256 = "1139dbb54509074b70893fab8554e3b079aa9f4d312058ce4018ef0019e3de12"
PREFIX = "llama_cpp_python-0.3.35/vendor/llama.cpp/"

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / "vendor" / "llama.cpp"
# A file present in every usable checkout; its absence means the directory is empty or partial.
MARKER = Path("include") / "llama.h"
STAMP = ".pyllama-source"


def say(msg: str) -> None:
    print(f"fetch_llama_cpp: {msg}", flush=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_sdist(into: Path) -> Path:
    # Only llama-cpp-python itself must come as an sdist. `--no-binary :all:` would also apply to
    # the build requirements pip installs to read the sdist's metadata, and build cmake from source.
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        "llama-cpp-python",
        "--disable-pip-version-check",
        "-d",
        str(into),
        SDIST_REQUIREMENT,
    ]
    say("downloading " + SDIST_REQUIREMENT + " sdist with pip")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    path = into / SDIST_NAME
    if not path.is_file():
        raise SystemExit(f"fetch_llama_cpp: pip did not produce {SDIST_NAME} in {into}")
    return path


def try_git_submodule() -> bool:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return False
    say("trying `git submodule update --init vendor/llama.cpp`")
    try:
        proc = subprocess.run(
            ["git", "-C", str(ROOT), "submodule", "update", "--init", "--depth", "1", "vendor/llama.cpp"],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except subprocess.TimeoutExpired:
        say("git timed out")
        return False
    if proc.returncode != 0 or not (DEST / MARKER).is_file():
        reason = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        say(f"git could not fetch the submodule ({reason}); using the PyPI sdist instead")
        return False
    say("vendor/llama.cpp checked out by git")
    return True


def extract(sdist: Path, dest: Path) -> int:
    count = 0
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(PREFIX):
                continue
            rel = m.name[len(PREFIX) :]
            # The sdist's own submodule pointer (a '.git' file) would make git think this is a
            # checkout of llama-cpp-python's repository: leave it out.
            if not rel or rel == ".git" or rel.startswith(".git/"):
                continue
            if not (m.isfile() or m.isdir() or m.issym()):
                continue
            m.name = rel
            members.append(m)
        tar.extractall(dest, members=members, filter="data")
        count = sum(1 for m in members if m.isfile())
    return count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", type=Path, help="use this llama-cpp-python-0.3.35 sdist instead of downloading it")
    ap.add_argument("--force", action="store_true", help="replace vendor/llama.cpp even if it is filled")
    ap.add_argument("--no-git", action="store_true", help="do not try `git submodule update` first")
    args = ap.parse_args()

    if (DEST / MARKER).is_file() and not args.force:
        origin = (DEST / STAMP).read_text().strip() if (DEST / STAMP).is_file() else "a git checkout"
        say(f"vendor/llama.cpp is already filled ({origin}); nothing to do")
        return 0

    if not args.force and not args.sdist and not args.no_git and try_git_submodule():
        return 0

    with tempfile.TemporaryDirectory(prefix="pyllama-fetch-") as tmp:
        sdist = args.sdist if args.sdist else download_sdist(Path(tmp))
        digest = sha256_of(sdist)
        if digest != SDIST_SHA256:
            say(f"sha256 mismatch for {sdist.name}: got {digest}, expected {SDIST_SHA256}; nothing extracted")
            return 1
        say(f"sha256 verified for {sdist.name}")
        staging = Path(tmp) / "llama.cpp"
        staging.mkdir()
        n = extract(sdist, staging)
        if not (staging / MARKER).is_file():
            say(f"{sdist.name} has no {PREFIX}{MARKER}; nothing changed")
            return 1
        (staging / STAMP).write_text(f"{SDIST_REQUIREMENT} sdist, llama.cpp {PIN_COMMIT}\n")
        DEST.parent.mkdir(parents=True, exist_ok=True)
        if DEST.exists():
            shutil.rmtree(DEST)
        shutil.move(str(staging), str(DEST))
    say(f"extracted {n} files of llama.cpp {PIN_COMMIT[:9]} into vendor/llama.cpp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
