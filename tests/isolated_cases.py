"""Run many small bad-input snippets in as few subprocesses as possible, while keeping each one crash-isolated.

One interpreter runs the snippets in order, printing a "start" line before each and its outcome after it. If the
interpreter dies (a crash, an abort), the snippet that started without finishing is recorded as the crash, and a new
interpreter carries on with the ones after it. Each snippet gets its own fresh namespace from `setup` and its own
temporary directory, so it sees the same starting state as it would alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import run_python

_RUNNER = """
import hashlib, json, os, sys, traceback
setup, cases, tmp = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
for name, code in cases.items():
    print(json.dumps({"start": name}), flush=True)
    ns = {"TMP": os.path.join(tmp, hashlib.sha1(name.encode()).hexdigest()[:12])}
    os.makedirs(ns["TMP"], exist_ok=True)
    try:
        exec(setup, ns)
    except BaseException as e:
        out = {"case": name, "setup_error": "".join(traceback.format_exception(e))}
    else:
        try:
            exec(code, ns)
        except BaseException as e:
            types = [c.__name__ for c in type(e).__mro__]
            param = getattr(e, "param", None)
            out = {"case": name, "type": type(e).__name__, "types": types, "msg": str(e), "param": param}
        else:
            out = {"case": name, "type": None, "msg": ""}
    print(json.dumps(out), flush=True)
"""


def run_cases(setup: str, cases: dict[str, str], tmp: Path, timeout: float = 300) -> dict[str, dict[str, Any]]:
    """Each case's outcome: {"type": exception type name or None, "msg": str}, or {"crash": returncode, "stderr":
    ...} for the case during which the interpreter died, or {"setup_error": traceback}."""
    results: dict[str, dict[str, Any]] = {}
    pending = list(cases)
    while pending:
        proc = run_python(_RUNNER, setup, json.dumps({n: cases[n] for n in pending}), str(tmp), timeout=timeout)
        started: str | None = None
        for line in proc.stdout.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # something the snippet itself printed
            if not isinstance(rec, dict):
                continue
            if "start" in rec:
                started = rec["start"]
            elif rec.get("case") == started:
                results[rec.pop("case")] = rec
                started = None
        if started is not None:
            results[started] = {"crash": proc.returncode, "stderr": proc.stderr[-2000:]}
        elif proc.returncode != 0:  # died between cases: blame the next one so that the loop moves on
            nxt = next(n for n in pending if n not in results)
            results[nxt] = {"crash": proc.returncode, "stderr": proc.stderr[-2000:]}
        pending = [n for n in pending if n not in results]
    return results


def check_case(result: dict[str, Any], exc_type: str, fragment: str) -> None:
    """Assert that a case raised `exc_type` (or a subclass of it) with `fragment` in its message, and did not
    crash."""
    assert "crash" not in result, f"crashed with {result['crash']}: {result['stderr']}"
    assert "setup_error" not in result, result["setup_error"]
    assert exc_type in result.get("types", [result["type"]]), result
    assert fragment in result["msg"], result
