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


import server_bench  # noqa: E402


def test_fit_to_tokens_takes_the_longest_prefix_within_the_target() -> None:
    """With a made-up count (one token a word, one more for every 4 letters beyond the first 4), the longest
    prefix of at most 10 tokens is the one counted by hand."""

    def count(text: str) -> int:
        return sum(1 + max(0, len(w) - 1) // 4 for w in text.split())

    words = "aa bbbbbb cc dddddddddd e ff gggggg h".split()  # 1 2 1 3 1 1 2 1 tokens: 8 after 5 words, 11 after 7
    assert run.fit_to_tokens(words, 10, count) == ("aa bbbbbb cc dddddddddd e ff", 9)
    assert run.fit_to_tokens(words, 11, count) == ("aa bbbbbb cc dddddddddd e ff gggggg", 11)
    assert run.fit_to_tokens(words, 99, count) == (" ".join(words), 12)
    assert run.fit_to_tokens(words, 0, count) == ("", 0)


def test_system_prompts_are_deterministic_and_differ_from_their_first_word() -> None:
    """Each repetition's fresh prompt text starts with a word no other variant (of the first len(OPENERS))
    starts with, and the same variant is the same text on every call."""
    first = [run.system_prompt_words(v, 300) for v in range(len(run.OPENERS))]
    assert len({w[0] for w in first}) == len(run.OPENERS)
    assert all(len(w) == 300 for w in first)
    assert run.system_prompt_words(3, 300) == first[3]
    text, n = run.system_prompt(5, 40, lambda t: len(t.split()))
    assert n == 40 and text.split() == first[5][:40]


def test_chat_bodies_share_the_system_prompt_and_differ_in_the_user_turn() -> None:
    bodies = run.chat_bodies("RULES", ["q1", "q2"], 16)
    assert [b["messages"] for b in bodies] == [
        [{"role": "system", "content": "RULES"}, {"role": "user", "content": "q1"}],
        [{"role": "system", "content": "RULES"}, {"role": "user", "content": "q2"}],
    ]
    for b in bodies:
        assert b["stream"] is True and b["max_tokens"] == 16 and b["temperature"] == 0.0 and b["ignore_eos"] is True
        assert b["stream_options"] == {"include_usage": True}
    assert len(set(run.PROMPT_QUESTIONS[:8])) == 8  # the 8 concurrent chats' user turns all differ


def test_prompt_rounds_are_recorded_and_the_servers_alternate() -> None:
    phase: dict = {}
    reply = {"latency": 2.0, "ttft": 1.5, "prompt_tokens": 1480, "completion_tokens": 16, "cached_tokens": 0}
    server_bench.record_round(phase, 3.0, [reply, {**reply, "ttft": 1.0}])
    server_bench.record_round(phase, 4.0, [reply])
    assert phase["wall"] == [3.0, 4.0]
    assert phase["ttft"] == [[1.5, 1.0], [1.5]]
    assert phase["cached_tokens"] == [[0, 0], [0]]
    names = ["llama-server", "pyllama"]
    assert [server_bench.alternate(names, r) for r in range(3)] == [names, names[::-1], names]


def prompt_results(tmp_path: Path) -> dict:
    def phase(wall: list[float], ttft: list[list[float]], cached: int | None, prompt: int = 1480) -> dict:
        return {
            "wall": wall,
            "ttft": ttft,
            "latency": [[w] * len(t) for w, t in zip(wall, ttft, strict=True)],
            "prompt_tokens": [[prompt + i for i in range(len(t))] for t in ttft],
            "completion_tokens": [[16] * len(t) for t in ttft],
            "cached_tokens": [[cached] * len(t) for t in ttft],
        }

    return {
        "meta": {"cpu": "Test CPU", "threads": 2, "reps": 3},
        "prompt": {
            "slots": 2,
            "n_ctx": 4096,
            "max_tokens": 16,
            "reps": 3,
            "cold": "restart",
            "target_tokens": 1452,
            "system_tokens": [1452, 1451, 1452],
            "single_tokens": [1450, 1452, 1452],
            "llama-server": {
                "cold": phase([6.0, 7.0, 6.5], [[5.0, 6.0], [5.5, 6.8], [5.2, 6.1]], 0),
                "warm": phase([0.8, 0.9, 1.0], [[0.3, 0.4], [0.3, 0.5], [0.2, 0.4]], 1470),
                "single": phase([2.5, 2.4, 2.6], [[2.3], [2.2], [2.4]], 0),
                "peak_rss_mib": 800.0,
                "argv": [str(tmp_path / "llama-server"), "-m", "model.gguf", "--port", "43210", "-np", "2"],
            },
            "pyllama": {
                "cold": phase([5.0, 5.5, 5.2], [[4.0, 5.0], [4.4, 5.4], [4.1, 5.1]], 0),
                "warm": phase([1.0, 1.0, 1.2], [[0.5, 0.5], [0.4, 0.6], [0.5, 0.7]], None),
                "single": phase([2.0, 2.2, 2.1], [[1.9], [2.0], [2.1]], 0),
                "peak_rss_mib": 600.0,
                "argv": ["python", "-m", "pyllama.server", "model.gguf", "--port", "43211", "--parallel", "2"],
            },
        },
    }


def test_report_prompt_section(tmp_path: Path) -> None:
    """The prompt-heavy section holds the medians computed by hand, the ratio llama-server / pyllama, the token
    counts the servers reported, its peak RSS row, and the commands without local paths or ports."""
    doc = tmp_path / "benchmarks.md"
    report.write(prompt_results(tmp_path), doc)
    text = doc.read_text()
    assert "## 5. Server: prompt-heavy load" in text and "## 8. Peak RSS" in text
    assert "1,450-1,452 tokens" in text  # the system prompts' own counts, chats and long prompt together
    assert "above 1,\npyllama is faster" in text
    # cold wall: medians 6.5 and 5.2; first tokens of all 6 requests: 5.75 and 4.70; the last of each round: 6.1, 5.1
    assert "| 2 chats, cold: wall time, sending all to the last one done | 6.50 | 5.20 | 1.250 |" in text
    assert "| 2 chats, cold: time to first token, median request | 5.75 | 4.70 | 1.223 |" in text
    assert "| 2 chats, cold: time to first token, last request | 6.10 | 5.10 | 1.196 |" in text
    assert "| 2 chats, second identical round (warm): wall time | 0.90 | 1.00 | 0.900 |" in text
    assert (
        "| 2 chats, second identical round (warm): time to first token, median request | 0.35 | 0.50 | 0.700 |" in text
    )
    assert "| one long prompt, cold: wall time | 2.50 | 2.10 | 1.190 |" in text
    assert "| one long prompt, cold: time to first token | 2.30 | 2.00 | 1.150 |" in text
    assert "| prompt tokens of each chat (the server's count) | 1,480-1,481 | 1,480-1,481 |" in text
    assert "| prompt tokens reused from a cache, cold rounds (most) | 0 | 0 |" in text
    assert "| prompt tokens reused from a cache, warm rounds | 1,470 | - |" in text  # pyllama reported none here
    assert "| prompt-heavy server, 2 slots, 4096-token context | 800 | 600 | - |" in text
    assert "- llama-server: `llama-server -m model.gguf --port 8080 -np 2`" in text
    assert str(tmp_path) not in text
    assert "did not generate the same number of tokens" not in text

    res = prompt_results(tmp_path)
    res["prompt"]["pyllama"]["cold"]["completion_tokens"][1] = [6, 16]  # one reply ended at a stop string
    report.write(res, doc)
    text = doc.read_text()
    assert "| completion tokens of each reply | 16 | 6-16 |" in text
    assert "did not generate the same number of tokens" in text


def test_report_prompt_section_users_solo_and_targets(tmp_path: Path) -> None:
    """The users' waves: the median over repetitions of each round's mean first-token time, its ratio
    and target; the cold replies against the solo runs; the burst's wall-time target."""
    res = prompt_results(tmp_path)
    pr = res["prompt"]
    pr["users"] = {"n": 4, "wave": 2, "interval_s": 1.0}

    def users(ttft: list[list[float]], cached: int) -> dict:
        return {"wall": [10.0] * len(ttft), "ttft": ttft, "cached_tokens": [[cached] * len(t) for t in ttft]}

    # llama-server: round means 8, 10, 12 -> median 10; pyllama: 2, 2.5, 3 -> median 2.5 (0.25x: met)
    pr["llama-server"]["users"] = users([[6, 10, 6, 10], [10, 10, 10, 10], [12, 12, 12, 12]], 0)
    pr["pyllama"]["users"] = users([[1, 3, 1, 3], [2.5, 2.5, 2.5, 2.5], [3, 3, 3, 3]], 1450)
    # the solo runs, with each token's text and top-2 margin: " e2" was a near-tie (under 1e-3)
    near_tie = {"text": "e1 e2", "pieces": ["e1", " e2"], "margins": [1.0, 0.0005]}
    clear = {"text": "f", "pieces": ["f"], "margins": [1.0]}
    pr["solo"] = [["a", "b"], ["c", "d"], [near_tie, clear]]
    pr["pyllama"]["cold"]["text"] = [["a", "b"], ["c", "d"], ["e1 e3", "x"]]  # parts at the near-tie; differs
    pr["llama-server"]["cold"]["text"] = [["a", "b"], ["c", "d"], ["e1 e2", "f and more"]]
    doc = tmp_path / "benchmarks.md"
    report.write(res, doc)
    text = doc.read_text()
    assert "| 4 users, 2 at a time every 1 s: mean time to first token | 10.00 | 2.50 | 4.000 |" in text
    assert "| prompt tokens reused, users (fewest-most) | 0 | 1,450 |" in text
    assert "| pyllama | 4 of 6 | 1 | 1 | 1.000 |" in text and "| llama-server | 6 of 6 | 0 | 0 | - |" in text
    assert "| users in waves: pyllama's mean TTFT ≤ 0.3x llama-server's | 0.25x |" in text
    assert (
        "| each cold chat's reply equal to its solo run up to a near-tie (pyllama) "
        "| 4 equal, 1 at a near-tie, 1 differ, of 6 | **missed** |" in text
    )
    # cold walls 6.5 and 5.2: 0.80x, not the 0.2x asked for
    assert "| 2 chats, cold: pyllama's wall ≤ 0.2x llama-server's | 0.80x |" in text


def test_report_prompt_section_with_one_server_and_without_the_section(tmp_path: Path) -> None:
    res = prompt_results(tmp_path)
    del res["prompt"]["pyllama"]
    doc = tmp_path / "benchmarks.md"
    report.write(res, doc)
    assert "| 2 chats, cold: wall time, sending all to the last one done | 6.50 | - | - |" in doc.read_text()
    del res["prompt"]
    report.write(res, doc)
    text = doc.read_text()
    assert "prompt-heavy" not in text and "## 5." not in text


def test_mtmd_cli_times_read_what_llama_mtmd_cli_prints() -> None:
    """llama-mtmd-cli's encode line and llama.cpp's prompt-eval line, made from their own format strings
    (tools/mtmd/mtmd-cli.cpp, src/llama-context.cpp) with known values, parse back to those values."""
    cli = (ROOT / "vendor/llama.cpp/tools/mtmd/mtmd-cli.cpp").read_text()
    enc = re.search(r'LOG_INF\("(mtmd batch encoding done in [^"]*)\\n"', cli)
    ctx = (ROOT / "vendor/llama.cpp/src/llama-context.cpp").read_text()
    ev = re.search(r'LLAMA_LOG_INFO\("(%s: prompt eval time = [^"]*)\\n"', ctx)
    assert enc and ev
    text = "".join(f"0.00.148.715 I {enc.group(1) % ms}\n" for ms in (37, 40))  # two turns
    text += "0.00.228.320 I " + ev.group(1) % ("llama_perf_context_print", 7.06, 61, 0.12, 8636.56) + "\n"
    assert run.mtmd_cli_times(text) == ([37.0, 40.0], 7.06)
    with pytest.raises(RuntimeError):
        run.mtmd_cli_times("nothing here")


def test_report_media_section_and_targets(tmp_path: Path) -> None:
    """The image section: medians computed by hand, llama-mtmd-cli / pyllama, and the 0.98x targets."""
    res = {
        "meta": {"cpu": "Test CPU", "threads": 2, "reps": 3},
        "media": {
            "argv": [str(tmp_path / "llama-mtmd-cli"), "-m", "tiny.gguf"],
            "llama-mtmd-cli": {"encode_ms": [40.0, 44.0, 42.0], "ttft_ms": [60.0, 58.0, 62.0], "peak_rss_mib": 90.0},
            "pyllama": {
                "encode_ms": [41.0, 40.0, 43.0],
                "ttft_ms": [66.0, 64.0, 65.0],
                "n_prompt": 80,
                "n_image_tokens": 64,
                "peak_rss_mib": 120.0,
            },
        },
    }
    doc = tmp_path / "benchmarks.md"
    report.write(res, doc)
    text = doc.read_text()
    assert "| image encode | 42.0 | 41.0 | 1.024 |" in text  # medians 42 and 41
    assert "| time to first token | 60.0 | 65.0 | 0.923 |" in text
    assert "| image encode: pyllama ≥ 0.98x llama-mtmd-cli | 1.02x | met |" in text
    assert "| time to first token with an image: pyllama ≥ 0.98x llama-mtmd-cli | 0.92x | **missed** |" in text
    assert "| an image in the prompt (tiny llama) | 90 | 120 | - |" in text
    assert str(tmp_path) not in text


def test_parse_spec_simple_reads_what_llama_speculative_simple_prints() -> None:
    """llama-speculative-simple's closing lines, made from its own format strings
    (examples/speculative-simple/speculative-simple.cpp) with known values, parse back to those values."""
    src = (ROOT / "vendor/llama.cpp/examples/speculative-simple/speculative-simple.cpp").read_text()
    fmts = [bytes(m, "utf-8").decode("unicode_escape") for m in re.findall(r'LOG_INF\("((?:[^"\\]|\\.)*)"', src)]
    values = {
        "encoded": (216, 0.303, 712.467),
        "decoded": (209, 1.003, 208.396),
        "n_draft ": (3,),
        "n_predict": (209,),
        "n_drafted": (204,),
        "n_accept ": (201,),
        "accept    =": (98.529,),
    }
    lines = []
    for f in fmts:
        key = next((k for k in values if f.startswith(k)), None)
        if key:
            lines.append("0.02.355.797 I " + f % values[key])
    assert len(lines) == len(values), fmts
    assert run.parse_spec_simple("".join(lines)) == {
        "encoded_tokens": 216,
        "encoded_s": 0.303,
        "decoded_tokens": 209,
        "decoded_s": 1.003,
        "n_drafted": 204,
        "n_accept": 201,
    }
    with pytest.raises(RuntimeError, match=r"decoded|encoded"):
        run.parse_spec_simple("main: error: failed to load model\n")


def test_spec_prompts_and_the_tools_generated_text() -> None:
    """The copy-heavy prompt is the passage and its first 20 words; the editing request holds the file and
    ends with an opening fence; what a tool generated is what it printed after the prompt."""
    prompt = run.copy_prompt("a b c d e f", 3)
    assert prompt == "a b c d e f\n\na b c"
    words = run.SPEC_PASSAGE.split()
    assert 140 <= len(words) <= 170 and run.copy_prompt().endswith("\n\n" + " ".join(words[:20]))
    edit = run.edit_prompt()
    assert run.SPEC_FILE in edit and edit.endswith("```\n") and run.SPEC_CHANGE[0] in run.SPEC_FILE
    assert run.generated_text("\n\n<bos>a b c d e f\n\na b c d e f\n\n", prompt) == " d e f\n\n"
    with pytest.raises(RuntimeError):
        run.generated_text("error", prompt)
    assert run.copied_tokens([1, 2, 3, 4, 5], [1, 2, 9, 4, 5, 6]) == 4


def spec_results(tmp_path: Path) -> dict:
    truth_text = "one two three four"
    truth = {"text": truth_text, "pieces": ["one", " two", " three", " four"], "margins": [2.0, 0.3, 1.5, 0.8]}

    def arm(rates: list[float], texts: list[str], acc=(0, 0, 0), rej=(0, 0, 0), wall=(1.0, 1.0, 1.0)) -> dict:
        return {
            "decode_tps": rates,
            "wall_s": list(wall),
            "ttft_s": [0.3] * 3,
            "tokens": [160, 160, 160],
            "accepted": list(acc),
            "rejected": list(rej),
            "text": texts,
            "prompt_tokens": [216] * 3,
        }

    same = [truth_text] * 3
    runs = [
        {"n_drafted": 204, "n_accept": 200},
        {"n_drafted": 204, "n_accept": 204},
        {"n_drafted": 210, "n_accept": 202},
    ]
    return {
        "meta": {"cpu": "Test CPU", "logical_cpus": 2, "threads": 2, "reps": 3},
        "spec": {
            "date": "2026-12-06",
            "n_ctx": 2048,
            "load": [1.2, 2.5, 1.9],
            "copy": {
                "prompt": "PASSAGE",
                "max_tokens": 160,
                "passage_words": 164,
                "argv": {"llama-completion": [str(tmp_path / "llama-completion"), "-m", "model.gguf", "-p", "PASSAGE"]},
                "truth": truth,
                "verify_ms": {"1": 14.0, "16": 5.0, "64": 4.0},
                "pyllama": {
                    "plain": arm([60.0, 64.0, 62.0], same),
                    # one run parts from the plain decode after " two", where the plain decode's margin was 0.3
                    "ngram-simple": arm(
                        [150.0, 160.0, 155.0], [truth_text, "one two four", truth_text], (140, 150, 145)
                    ),
                    "ngram-mod": arm([200.0, 210.0, 190.0], same, (156, 156, 156)),
                },
                "pyllama_peak_rss_mib": 400.0,
                "llama.cpp": {
                    "llama-completion": {"decode_tps": [65.0, 66.0, 64.0], "text": [truth_text + "\n"] * 3, "runs": []},
                    "llama-speculative-simple": {
                        "decode_tps": [190.0, 200.0, 195.0],
                        "text": [truth_text + " five"] * 3,  # it runs past -n: equal as far as the shorter goes
                        "runs": runs,
                        "peak_rss_mib": 310.0,
                    },
                },
            },
            "edit": {
                "file_tokens": 375,
                "kwargs": {"max_tokens": 439, "stop": ["```"]},
                "truth": {"text": "file", "pieces": ["file"], "margins": [1.0]},
                "copied": 354,
                "reply_tokens": 380,
                "changed": False,
                "pyllama": {
                    "plain": arm([60.0, 62.0, 64.0], ["file"] * 3, wall=(7.0, 6.0, 6.5)),
                    "prediction": arm([200.0, 180.0, 190.0], ["file"] * 3, (341,) * 3, (16,) * 3, (2.5, 2.0, 3.0)),
                },
            },
            "free": {
                "type": "ngram-mod",
                "prompts": ["Write a short story about a fox. Once upon a time,", "another"],
                "kwargs": {"max_tokens": 128, "ignore_eos": True, "repeat_penalty": 1.3},
                # pairs 0.983, 1.0, 0.961: median 0.983; medians 62 and 61.5: 0.992
                "pyllama": {"plain": arm([60.0, 62.0, 64.0], ["a"] * 3), "best": arm([59.0, 62.0, 61.5], ["a"] * 3)},
            },
        },
    }


def test_report_spec_section_and_targets(tmp_path: Path) -> None:
    """The speculative section: medians and ratios to the decode without drafts computed by hand, the runs
    whose text parts from the plain decode with the plain decode's margin there, llama.cpp's tools against
    each other, the prediction's wall-time ratio, and the targets' verdicts."""
    doc = tmp_path / "benchmarks.md"
    report.write(spec_results(tmp_path), doc)
    text = doc.read_text()
    assert "## 7. Speculative decoding and predicted outputs" in text and "Measured on 2026-12-06" in text
    assert "1-minute load average before each process of the run: 1.2-2.5" in text
    assert "| pyllama, no drafts | 62.0 | 1.000 | - | 3 of 3 |" in text
    # medians 155 and 200 over 62; accepted 145, rejected 0
    assert "| pyllama, `ngram-simple` | 155.0 | 2.500 | 145 / 0 | 2 of 3 (the others part where" in text
    assert "top-2 margin was 0.300) |" in text
    assert "| pyllama, `ngram-mod` | 200.0 | 3.226 | 156 / 0 | 3 of 3 |" in text
    assert "| llama.cpp `llama-completion` | 65.0 | 1.000 | - | 3 of 3 |" in text
    # 195 / 65; accepted 202 (median of 200, 204, 202), rejected 4 (of 4, 0, 8)
    assert "| llama.cpp `llama-speculative-simple`, `ngram-simple` | 195.0 | 3.000 | 202 / 4 | 3 of 3 |" in text
    assert "1 token: 14.00 ms a token, 16 tokens: 5.00 ms a token, 64 tokens: 4.00 ms a token" in text
    assert "at most 3.5x\nas fast with batches of 64" in text
    assert "- llama-completion: `llama-completion -m model.gguf -p PROMPT`" in text
    assert "| without the prediction | 6.50 | 62.0 | 160 | - | 3 of 3 |" in text
    assert "| with the prediction | 2.50 | 190.0 | 160 | 341 / 16 | 3 of 3 |" in text
    assert "copies 354 of the\nfile's 375 tokens" in text and "does not make the change" in text
    assert "| `ngram-mod` on | 61.5 | 0.992 | 0.983 | 0 accepted, 0 rejected |" in text
    assert "| n-gram drafts, copy-heavy prompt | 310 | 400 | - |" in text
    assert (
        "| copy-heavy prompt: the best n-gram type ≥ 3x the decode without drafts | `ngram-mod` 3.23x | met |" in text
    )
    assert (
        "| copy-heavy prompt: the n-gram types' text equal to the decode without drafts | 5 of 6 runs | **missed** |"
        in text
    )
    assert "| predicted outputs: the reply ≥ 2x as fast with the prediction (wall time) | 2.60x | met |" in text
    assert "| nothing to draft: the best type at most 3% slower | 0.983x (pairs), 0.992x (medians) | met |" in text
    assert str(tmp_path) not in text


def test_report_puts_one_section_into_a_page_and_keeps_the_rest(tmp_path: Path) -> None:
    """Writing one section's results into a page that holds others keeps the others, the machine table and
    the notes as they were, puts the section in at its place with the sections numbered in order, and adds
    or replaces only its own rows of the Peak RSS and Targets tables."""
    doc = tmp_path / "benchmarks.md"
    report.write(synthetic(tmp_path), doc)
    page = doc.read_text().replace("<!-- notes -->\n", "<!-- notes -->\n## Notes\nHand-written.\n")
    page = page.replace("## 3. Second-turn", "Added by hand to section 1.\n\n## 3. Second-turn")
    doc.write_text(page)
    res = spec_results(tmp_path)
    res["meta"]["cpu"] = "Another CPU"
    res["speed"] = {"llama-bench": {}}  # results of another section that is not asked for are not used
    report.write(res, doc, only=["spec"])
    text = doc.read_text()
    before = page.split("## 8. Peak RSS")[0]  # the full page numbers Peak RSS after section 7
    spec_at = text.index("## 7. Speculative decoding")
    assert text[:spec_at] == before.replace("## 8. Peak RSS", "")  # sections 1 and 3, the machine, unchanged
    assert "Test CPU" in text and "Another CPU" not in text and "Added by hand to section 1." in text
    assert text.index("## 3. Second-turn") < spec_at < text.index("## 8. Peak RSS") < text.index("## Targets")
    assert "## Notes\nHand-written." in text
    assert "| pp512 + tg128 (speed section) | - | 400 | - |" in text  # the old rows stay
    assert "| n-gram drafts, copy-heavy prompt | 310 | 400 | - |" in text
    assert "| second-turn TTFT ≤ 1.2x the new turn alone | 1.25x | **missed** |" in text
    assert "| nothing to draft: the best type at most 3% slower | 0.983x (pairs), 0.992x (medians) | met |" in text

    # again with other figures: the section and its rows are replaced, not added twice
    res["spec"]["free"]["pyllama"]["best"]["decode_tps"] = [57.0, 58.0, 60.0]
    report.write(res, doc, only=["spec"])
    text = doc.read_text()
    assert text.count("## 7. Speculative decoding") == 1 and text.count("| nothing to draft:") == 1
    assert (
        "| nothing to draft: the best type at most 3% slower | 0.938x (pairs), 0.935x (medians) | **missed** |" in text
    )
    assert text.count("| n-gram drafts, copy-heavy prompt |") == 1
