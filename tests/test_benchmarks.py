"""The benchmark suite's own logic (benchmarks/), without running any benchmark.

The truths: llama.cpp's own printf formats for the performance lines that `llama-completion` prints
(read from vendor/llama.cpp and filled in here), and figures computed by hand from synthetic samples.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402
import run  # noqa: E402


def c_formats(path: Path, function: str) -> list[str]:
    """The format strings of one C++ function's log calls."""
    src = path.read_text()
    body = src[src.index(f"void {function}(") :]
    body = body[: body.index("\n}\n")]
    return [bytes(m, "utf-8").decode("unicode_escape") for m in re.findall(r'LOG_INF\("((?:[^"\\]|\\.)*)"', body)]


def test_parse_perf_reads_what_llama_completion_prints() -> None:
    """llama-completion's closing lines, made from common_perf_print's own format strings with known values,
    parse back to those values."""
    fmts = c_formats(ROOT / "vendor/llama.cpp/common/sampling.cpp", "common_perf_print")
    assert len(fmts) >= 6, fmts
    values = {
        "sampling time": (31.25,),
        "samplers time": (17.5, 262),
        "load time": (39.93,),
        "prompt eval time": (0.6, 6, 0.1, 10000.0),
        "eval time": (235.38, 255, 0.92, 1083.37),
        "total time": (277.01, 261),
        "unaccounted time": (12.3, 4.4),
        "graphs reused": (254,),
    }
    lines = []
    for f in fmts:
        key = next(k for k in sorted(values, key=len, reverse=True) if k in f)
        lines.append("0.00.417.938 I " + f % ("common_perf_print", *values[key]))
    got = run.parse_perf("".join(lines))
    assert got == {
        "prompt_eval_ms": 0.6,
        "eval_ms": 235.38,
        "eval_runs": 255,
        "total_ms": 277.01,
        "sampling_ms": 31.25,
    }


def test_parse_perf_refuses_output_without_the_lines() -> None:
    with pytest.raises(RuntimeError, match=r"total_ms|prompt_eval_ms"):
        run.parse_perf("main: error: failed to load model\n")


def test_merge_pools_rounds() -> None:
    a = {"samples": {"tg": [1.0, 2.0]}, "peak_rss_mib": 300.0, "version": "x"}
    run.merge(a, {"samples": {"tg": [3.0], "pp": [9.0]}, "peak_rss_mib": 250.0, "version": "y"})
    assert a == {"samples": {"tg": [1.0, 2.0, 3.0], "pp": [9.0]}, "peak_rss_mib": 300.0, "version": "y"}


def synthetic(tmp_path: Path) -> dict:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"")
    return {
        "meta": {"cpu": "Test CPU", "threads": 2, "reps": 3},
        "speed": {
            "argv": [str(tmp_path / "llama-bench"), "-m", str(model), "-p", "512"],
            "llama-bench": {"pp": {"samples": [500.0, 520.0, 510.0]}, "tg": {"samples": [60.0, 64.0, 62.0]}},
            "pyllama": {
                "samples": {
                    "pp_context_decode": [505.0, 515.0, 512.0],
                    "tg_generator_greedy": [58.0, 59.0, 60.0],
                },
                "peak_rss_mib": 400.0,
            },
        },
        "ttft": {
            "pyllama": {
                "second_turn": [0.09, 0.10, 0.11],
                "new_turn_only": [0.08, 0.08, 0.09],
                "whole_prompt": [1.6, 1.7, 1.5],
                "prompt_and_cached": [[833, 808]],
                "first_turn_tokens": 777,
                "peak_rss_mib": 500.0,
            }
        },
    }


def test_report_tables_ratios_and_targets(tmp_path: Path) -> None:
    """The page holds the medians, their ratios to llama-bench and the targets' verdicts computed by hand, shows
    commands without local paths, and keeps the hand-written notes when it is written again."""
    res = synthetic(tmp_path)
    doc = tmp_path / "benchmarks.md"
    report.write(res, doc)
    text = doc.read_text()
    pp = statistics.median([505.0, 515.0, 512.0]) / 510.0
    tg = statistics.median([58.0, 59.0, 60.0]) / 62.0
    assert f"| 512.0 | {pp:.3f} | 59.0 | {tg:.3f} |" in text
    assert f"| pp {pp:.3f}, tg {tg:.3f} | **missed** |" in text  # tg 0.952 < 0.98
    assert "| second-turn TTFT ≤ 1.2x the new turn alone | 1.25x | **missed** |" in text
    assert "`llama-bench -m model.gguf -p 512`" in text
    assert str(tmp_path) not in text

    doc.write_text(text.replace("<!-- notes -->\n", "<!-- notes -->\nMeasured on a quiet machine.\n"))
    res["ttft"]["pyllama"]["second_turn"] = [0.09, 0.09, 0.09]
    report.write(res, doc)
    text = doc.read_text()
    assert "Measured on a quiet machine." in text
    assert "| second-turn TTFT ≤ 1.2x the new turn alone | 1.12x | met |" in text
