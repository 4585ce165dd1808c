"""A live pyllama server for tests: its own process on 127.0.0.1, on a free port."""

from __future__ import annotations

from pathlib import Path

from conftest import free_port


class LiveServer:
    """``python -m pyllama.server`` in a process of its own on 127.0.0.1, logging to a file."""

    def __init__(self, model: Path, parallel: int, *extra: str) -> None:
        import subprocess
        import sys
        import tempfile
        import time

        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "pyllama.server", str(model), "--port", str(self.port), "--n-ctx", "2048"]
        argv += ["--parallel", str(parallel), "--n-threads", "1", "--log-level", "warning", *extra]
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise AssertionError(self.log.read().decode(errors="replace"))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the server did not start")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) / 1024

    def stop(self) -> str:
        """Stop the server; returns what it logged."""
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        self.log.close()
        return text
