"""llama.cpp's RPC backend: layers on a worker (`pyllama rpc-server`, on 127.0.0.1 here) give the greedy
tokens of the local run with weight repacking off (the worker's CPU backend does not repack, the local
one would, and their rounding differs); the worker serves llama.cpp's own llama-completion --rpc too; a
worker that is down at load time, or killed in the middle of a generation, is a LlamaError in the caller,
never an abort or a hang."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import pyllama

from conftest import free_port, run_python
from tiny_models import ROOT

N = 8
PROMPT = "The capital of France is"


class Worker:
    """`pyllama rpc-server` on 127.0.0.1, in a process of its own."""

    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "pyllama", "rpc-server", "--port", str(self.port), "--threads", "2", *extra]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        import socket

        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read().decode() if self.proc.stderr else ""
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("the RPC worker did not start")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    w = Worker()
    yield w
    w.stop()


def greedy(model: pyllama.Model, n: int = N) -> list[int]:
    """n greedy tokens after PROMPT by numpy's argmax over a low-level Context."""
    tokens = list(model.tokenize(PROMPT))
    with pyllama.Context(model, n_ctx=128, n_threads=2) as ctx:
        ctx.decode(pyllama.Batch.from_tokens(tokens))
        out: list[int] = []
        for _ in range(n):
            tok = int(np.argmax(ctx.logits()))
            out.append(tok)
            ctx.decode(pyllama.Batch.from_tokens([tok], pos0=len(tokens) + len(out) - 1))
        return out


@pytest.mark.real_model
def test_gemma_on_a_worker_and_split_gives_the_local_tokens(gemma_path: Path, worker: Worker) -> None:
    """All layers on the worker, and half of them (the rest on the local CPU): the greedy tokens of the
    local model without repacking. pyllama.devices() lists the worker's device."""
    with pyllama.Model(str(gemma_path), repack=False) as local:
        want = greedy(local)
        n_layer = int(local.n_layer)
    with pyllama.Model(str(gemma_path), rpc_servers=[worker.endpoint]) as remote:
        assert greedy(remote) == want
    with pyllama.Model(str(gemma_path), rpc_servers=[worker.endpoint], repack=False, n_gpu_layers=n_layer // 2) as half:
        assert greedy(half) == want
    remote_devices = [d for d in pyllama.devices() if d["backend"] == "RPC"]
    assert [d["description"] for d in remote_devices] == [worker.endpoint]
    assert remote_devices[0]["type"] == "gpu" and remote_devices[0]["memory_total"] > 0


@pytest.mark.real_model
def test_the_worker_serves_llama_completion_too(gemma_path: Path, worker: Worker) -> None:
    """llama.cpp's own llama-completion --rpc on `pyllama rpc-server`: the greedy text of a Llama whose
    layers are on the same worker."""
    tools = sorted(ROOT.glob("build/*/test-tools/llama-completion"))
    if not tools:  # pragma: no cover
        pytest.skip("llama-completion is not in the build tree (built unless -DPYLLAMA_TEST_TOOLS=OFF)")
    run = subprocess.run(
        [
            str(tools[-1]),
            *("-m", str(gemma_path), "--rpc", worker.endpoint, "-ngl", "99", "-p", PROMPT, "-n", str(N)),
            *("--temp", "0", "-t", "2", "-c", "128", "-no-cnv", "--no-display-prompt", "--no-warmup", "--ignore-eos"),
            "-v",  # its log says where the layers went
        ],
        capture_output=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    assert f"using device RPC0 ({worker.endpoint})".encode() in run.stderr  # its layers went to the worker
    with pyllama.Llama(gemma_path, n_ctx=128, n_threads=2, rpc_servers=[worker.endpoint]) as llm:
        out = llm.complete(PROMPT, max_tokens=N, temperature=0.0, ignore_eos=True)
    assert run.stdout.decode().strip("\n") == out["choices"][0]["text"]


def test_a_worker_that_is_down_is_an_error_at_load(tiny_model_path: Path) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(pyllama.ModelLoadError, match=f"127.0.0.1:{port}"):
        pyllama.Model(str(tiny_model_path), rpc_servers=[f"127.0.0.1:{port}"])
    with pytest.raises(pyllama.ModelLoadError):
        pyllama.Llama(tiny_model_path, rpc_servers=[f"127.0.0.1:{port}"])
    for bad in ("127.0.0.1", "host:port", ":50052", "h:99999"):
        with pytest.raises(pyllama.InvalidRequestError):
            pyllama.Model(str(tiny_model_path), rpc_servers=[bad])


def test_a_worker_killed_during_a_generation_is_a_llama_error(tmp_path: Path) -> None:
    """The worker is killed while a stream runs on it: the stream raises LlamaError, later calls do too,
    and closing the Llama and the interpreter's exit are clean (a fresh interpreter: an abort there
    would be a crash, not a pytest failure)."""
    w = Worker()
    try:
        code = """
            import sys
            sys.path.insert(0, sys.argv[2])
            import pyllama
            from tiny_models import write_tiny_llama
            path = write_tiny_llama(sys.argv[3], n_embd=128, n_layer=4, n_ff=256)
            llm = pyllama.Llama(path, rpc_servers=[sys.argv[1]], n_ctx=1024, n_threads=1)
            assert llm.complete("Once upon a time", max_tokens=4)["usage"]["completion_tokens"] == 4
            print("loaded", flush=True)
            sys.stdin.readline()  # the test kills the worker, then says so
            try:
                for chunk in llm.complete("Once upon a time", max_tokens=200, ignore_eos=True, stream=True):
                    pass
                print("stream ended normally")
            except pyllama.LlamaError as e:
                print("stream raised", type(e).__name__)
            try:
                llm.complete("again", max_tokens=3)
                print("call ended normally")
            except pyllama.LlamaError as e:
                print("call raised", type(e).__name__)
            llm.close()
            print("closed")
            # a model without rpc_servers, and its projector, stay on this machine (the worker's device is
            # no GPU for them)
            from tiny_models import write_tiny_mmproj_vision
            vision = write_tiny_mmproj_vision(sys.argv[3] + ".mmproj", text_n_embd=128)
            with pyllama.Llama(path, n_ctx=256, n_threads=1, mmproj=vision) as local:
                assert local.complete("Once upon a time", max_tokens=4)["usage"]["completion_tokens"] == 4
            print("local ok")
        """
        import textwrap

        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(code),
                w.endpoint,
                str(ROOT / "tests"),
                str(tmp_path / "m.gguf"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "loaded"
        w.stop()
        out, err = proc.communicate("go\n", timeout=120)
    finally:
        if w.proc.poll() is None:
            w.stop()
    assert proc.returncode == 0, err[-2000:]
    assert out.split("\n")[:4] == ["stream raised LlamaError", "call raised LlamaError", "closed", "local ok"], (
        out + err
    )


def test_rpc_serve_on_a_port_in_use_is_an_error() -> None:
    w = Worker()
    try:
        r = run_python(f"import pyllama; pyllama.rpc_serve('127.0.0.1', {w.port})", timeout=60)
        assert r.returncode != 0 and "LlamaError" in r.stderr
        r = subprocess.run(
            [sys.executable, "-m", "pyllama", "rpc-server", "--port", str(w.port)], capture_output=True, text=True
        )
        assert r.returncode == 1 and f"127.0.0.1:{w.port}" in r.stderr
    finally:
        w.stop()


def test_a_worker_beyond_loopback_warns() -> None:
    w = Worker("--host", "0.0.0.0")
    try:
        time.sleep(0.5)
    finally:
        w.stop()
    assert w.proc.stderr is not None and b"no authentication" in w.proc.stderr.read()
