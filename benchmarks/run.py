"""pyllama against llama.cpp's own tools and llama-cpp-python, on this machine, in one run.

    python benchmarks/run.py            # everything; writes docs/benchmarks.md and its plots
    python benchmarks/run.py --only speed,server --reps 3
    python benchmarks/run.py --only prompt --no-llama-cpp-python --reps 3
    python benchmarks/run.py --only spec --no-llama-cpp-python --reps 3
    python benchmarks/run.py --report   # only rewrite the report from the last results

The first run builds the llama.cpp tools the sections need (llama-bench, llama-completion,
llama-server, llama-speculative-simple) from vendor/llama.cpp and installs llama-cpp-python==0.3.35
into a virtual environment of its own (see refs.py); both are kept in benchmarks/.work/. Every
measurement runs in a process of its own, so each one's peak RSS is its own. Results:
benchmarks/.work/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import refs
import report
import server_bench

HERE = Path(__file__).resolve().parent
RESULTS = refs.WORK / "results.json"
log = refs.log

PROMPT = "The history of the old lighthouse on the northern cliffs began"
OVERHEAD_PROMPTS = [f"Story number {i}. Once upon a time, in a village by the sea, there lived" for i in range(1, 12)]
SERVER_PROMPTS = [
    f"Write a short story about {topic}. Once upon a time,"
    for topic in (
        "a lighthouse keeper",
        "a lost cat",
        "a clockmaker",
        "a mountain village",
        "a river boat",
        "a sleepy dragon",
        "a baker at dawn",
        "an old library",
        "a garden robot",
        "a winter fox",
        "a paper kite",
        "a harbour market",
        "a night train",
        "a painter's apprentice",
        "a desert well",
        "a snow globe",
    )
]
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}


def maxrss_mib(ru_maxrss: int) -> float:
    return server_bench.maxrss_mib(ru_maxrss)


def run_measured(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 3600) -> dict[str, Any]:
    """Runs a command to its end; its stdout, stderr, wall time and peak RSS (from wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                raise RuntimeError(f"timed out: {' '.join(argv)}")
            time.sleep(0.02)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited with {p.returncode}:\n{stderr[-3000:]}")
    return {"stdout": stdout, "stderr": stderr, "wall": wall, "peak_rss_mib": maxrss_mib(usage.ru_maxrss)}


def run_measured_stdin(argv: list[str], text: str, timeout: float = 600) -> dict[str, Any]:
    """Runs a command with `text` on its stdin (llama-mtmd-cli's chat mode); its stderr."""
    r = subprocess.run(argv, input=text.encode(), capture_output=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited with {r.returncode}:\n{r.stderr.decode(errors='replace')[-3000:]}")
    return {"stderr": r.stderr.decode(errors="replace")}


def worker(python: str, name: str, task: str, spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    r = run_measured([python, str(HERE / name), task, json.dumps(spec)], env=env)
    result = json.loads(r["stdout"].strip().splitlines()[-1])
    result["peak_rss_mib"] = r["peak_rss_mib"]
    return result


def default_threads(model: Path) -> int:
    import pyllama

    with pyllama.Model(str(model)) as m, pyllama.Context(m, n_ctx=256) as ctx:
        return ctx.n_threads


# --- 1. prompt and decode speed ---------------------------------------------------------------


def merge(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    """Pools one round's results into the earlier rounds': lists are extended, peak RSS is the
    largest, other values are the last."""
    for k, v in src.items():
        if isinstance(v, dict):
            merge(dst.setdefault(k, {}), v)
        elif isinstance(v, list) and isinstance(dst.get(k), list):
            dst[k].extend(v)
        elif k.endswith("peak_rss_mib") and dst.get(k) is not None:
            dst[k] = max(dst[k], v)
        else:
            dst[k] = v
    return dst


def bench_speed(cfg: dict[str, Any], res: dict[str, Any]) -> None:
    tools = cfg["tools"]
    model, threads, reps = str(cfg["gemma"]), cfg["threads"], cfg["reps"]
    argv = [str(tools["llama-bench"]), "-m", model, "-p", "512", "-n", "128", "-t", str(threads)]
    argv += ["-r", str(reps), "-o", "json"]
    spec = {"model": model, "threads": threads, "reps": reps, "prompt": PROMPT, "chat_template": "gemma"}
    out: dict[str, Any] = {"argv": argv}
    for i in range(cfg["rounds"]):
        log(f"speed, round {i + 1}/{cfg['rounds']}: llama-bench pp512/tg128")
        r = run_measured(argv)
        bench = {("pp" if t["n_prompt"] else "tg"): {"samples": t["samples_ts"]} for t in json.loads(r["stdout"])}
        merge(out, {"llama-bench": bench, "llama-bench_peak_rss_mib": r["peak_rss_mib"]})
        log(f"speed, round {i + 1}/{cfg['rounds']}: pyllama")
        merge(out, {"pyllama": worker(sys.executable, "worker_pyllama.py", "speed", spec)})
        if cfg.get("lcp"):
            log(f"speed, round {i + 1}/{cfg['rounds']}: llama-cpp-python")
            merge(out, {"llama-cpp-python": worker(cfg["lcp"], "worker_lcp.py", "speed", spec)})
    res["speed"] = out


# --- 2. per-token overhead --------------------------------------------------------------------

PERF = {
    "prompt_eval_ms": r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens",
    "eval_ms": r"\beval time =\s*([\d.]+) ms /\s*(\d+) runs",
    "total_ms": r"total time =\s*([\d.]+) ms /\s*(\d+) tokens",
    "sampling_ms": r"sampling time =\s*([\d.]+) ms",
}


def parse_perf(text: str) -> dict[str, float]:
    got = {}
    for key, pattern in PERF.items():
        m = re.findall(pattern, text)
        if not m:
            raise RuntimeError(f"llama-completion printed no '{key}' line:\n{text[-2000:]}")
        got[key] = float(m[-1][0] if isinstance(m[-1], tuple) else m[-1])
        if key == "eval_ms":
            got["eval_runs"] = int(m[-1][1])
    return got


def bench_overhead(cfg: dict[str, Any], res: dict[str, Any]) -> None:
    tools, threads, reps, n = cfg["tools"], cfg["threads"], cfg["reps"], cfg["n_overhead"]
    out: dict[str, Any] = {"n": n}
    for label, path in (("gemma", cfg["gemma"]), ("tiny", cfg["tiny"])):
        spec = {"model": str(path), "threads": threads, "reps": reps, "n": n, "n_ctx": 512}
        spec |= {"prompts": OVERHEAD_PROMPTS, "seed": 1}
        entry: dict[str, Any] = {"llama-completion": []}
        for k in range(cfg["rounds"]):
            log(f"overhead, round {k + 1}/{cfg['rounds']}: {label}: llama-completion, {n} tokens")
            for i in range(reps + 1):
                argv = [
                    str(tools["llama-completion"]),
                    "-m",
                    str(path),
                    "-p",
                    OVERHEAD_PROMPTS[i % len(OVERHEAD_PROMPTS)],
                ]
                argv += ["-n", str(n), "--ignore-eos", "-t", str(threads), "-tb", str(threads), "-c", "512"]
                argv += ["-b", "2048", "-ub", "512", "--seed", "1", "-no-cnv", "--temp", "0.8", "--top-k", "40"]
                argv += ["--top-p", "0.95", "--min-p", "0.05", "--repeat-penalty", "1.0"]
                r = run_measured(argv)
                perf = parse_perf(r["stderr"] + r["stdout"])
                if i:
                    entry["llama-completion"].append({**perf, "wall": r["wall"], "peak_rss_mib": r["peak_rss_mib"]})
                entry["argv"] = argv
            log(f"overhead, round {k + 1}/{cfg['rounds']}: {label}: pyllama")
            merge(entry, {"pyllama": worker(sys.executable, "worker_pyllama.py", "overhead", spec)})
            if cfg.get("lcp"):
                log(f"overhead, round {k + 1}/{cfg['rounds']}: {label}: llama-cpp-python")
                merge(entry, {"llama-cpp-python": worker(cfg["lcp"], "worker_lcp.py", "overhead", spec)})
        out[label] = entry
    res["overhead"] = out


# --- 3. second-turn time to first token --------------------------------------------------------


def long_history(n_words: int = 700) -> list[dict[str, str]]:
    words = (
        "the harbour town kept its records in a ledger of salt-stained pages where every ship that "
        "came and went was written down with its cargo its crew and the weather of the day"
    ).split()
    text = " ".join(words[i % len(words)] for i in range(n_words))
    return [
        {"role": "system", "content": "You are a careful assistant who answers in plain prose."},
        {"role": "user", "content": f"Here are my notes:\n\n{text}\n\nSummarise them in two sentences."},
    ]


FOLLOW_UPS = [
    "Thank you. Now list three questions a historian might ask about these records.",
    "Which detail of the notes seems most surprising to you, and why?",
    "Rewrite your summary for a ten-year-old reader, please.",
    "What might the weather entries tell us about the seasons there?",
    "Suggest a title for a short book based on these notes.",
    "Which of the records would you check first, and how?",
]


def bench_ttft(cfg: dict[str, Any], res: dict[str, Any]) -> None:
    spec = {
        "model": str(cfg["gemma"]),
        "threads": cfg["threads"],
        "reps": cfg["reps"],
        "n_ctx": 4096,
        "history": long_history(),
        "follow_ups": FOLLOW_UPS,
        "reply_tokens": 32,
        "chat_template": "gemma",
    }
    log("ttft: pyllama")
    out: dict[str, Any] = {"pyllama": worker(sys.executable, "worker_pyllama.py", "ttft", spec)}
    if cfg.get("lcp"):
        log("ttft: llama-cpp-python")
        out["llama-cpp-python"] = worker(cfg["lcp"], "worker_lcp.py", "ttft", spec)
    res["ttft"] = out


# --- 4. server ----------------------------------------------------------------------------------


def server_commands(cfg: dict[str, Any], n_ctx: int, lcp: bool) -> dict[str, list[str]]:
    """Each server's command line ("{port}" stands for its port): the same model, slots, context,
    threads, n_batch 2048 and n_ubatch 512. pyllama's server has no batch options: its Llama's
    defaults are these (n_batch 2048, capped at n_ctx; n_ubatch 512; n_threads_batch = n_threads)."""
    model, threads, slots = str(cfg["gemma"]), str(cfg["threads"]), str(cfg["slots"])
    servers = {
        "llama-server": [
            str(cfg["tools"]["llama-server"]),
            "-m",
            model,
            "--port",
            "{port}",
            "-np",
            slots,
            "-c",
            str(n_ctx),
            "-t",
            threads,
            "-tb",
            threads,
            "-b",
            "2048",
            "-ub",
            "512",
            "--no-webui",
        ],
        "pyllama": [
            sys.executable,
            "-m",
            "pyllama.server",
            model,
            "--port",
            "{port}",
            "--parallel",
            slots,
            "--n-ctx",
            str(n_ctx),
            "--n-threads",
            threads,
            "--log-level",
            "warning",
        ],
    }
    if lcp:
        servers["llama-cpp-python"] = [
            cfg["lcp"],
            "-m",
            "llama_cpp.server",
            "--model",
            model,
            "--port",
            "{port}",
            "--n_ctx",
            str(n_ctx),
            "--n_threads",
            threads,
            "--n_threads_batch",
            threads,
            "--n_batch",
            "2048",
            "--n_ubatch",
            "512",
            # By default it stops the running stream when a new request comes; queue, as the others do.
            "--interrupt_requests",
            "False",
        ]
    return servers


def bench_server(cfg: dict[str, Any], res: dict[str, Any]) -> None:
    import pyllama

    model, slots = str(cfg["gemma"]), cfg["slots"]
    n_ctx = str(cfg["server_n_ctx"])
    logs = refs.WORK / "logs"
    vocab = pyllama.Model(model, vocab_only=True)

    def count(text: str) -> int:
        return len(vocab.tokenize(text, add_special=False, parse_special=False))

    body = {"max_tokens": cfg["server_max_tokens"], "stream": True, "ignore_eos": True, **SAMPLING}
    body["stream_options"] = {"include_usage": True}
    servers = server_commands(cfg, int(n_ctx), bool(cfg.get("lcp")))
    out: dict[str, Any] = {
        "slots": slots,
        "n_ctx": int(n_ctx),
        "max_tokens": cfg["server_max_tokens"],
        "rounds": cfg["server_rounds"],
        "body": body,
    }
    started = []
    for name, argv in servers.items():
        port = server_bench.free_port()
        argv = [a.replace("{port}", str(port)) for a in argv]
        started.append(server_bench.Server(name, argv, port, logs / f"{name}.log"))
    log(f"server: {', '.join(servers)}; {cfg['levels']} clients, {cfg['server_reps']} repetitions")
    out |= server_bench.bench_servers(
        started,
        cfg["levels"],
        cfg["server_reps"],
        cfg["server_rounds"],
        SERVER_PROMPTS,
        body,
        count,
        warmup_clients=slots,
    )
    res["server"] = out


# --- 5. prompt-heavy server load ---------------------------------------------------------------

# The first word of each variant of the system prompt: variants differ from their first token on.
OPENERS = (
    "Harbour Orchard Lantern Meadow Quarry Foundry Vineyard Granary Observatory Tannery Apiary Brewery "
    "Ferry Smithy Chapel Bakery Mill Forge Wharf Pottery Dairy Kiln Loom Stable"
).split()
SUBJECTS = "the keeper,the clerk,each apprentice,the night watch,every visitor,the steward,the archivist".split(",")
VERBS = "records,checks,repairs,counts,inspects,cleans,labels,measures,reports,stores".split(",")
THINGS = "lamps,ledgers,ropes,barrels,lenses,keys,sails,maps,bells,crates,nets,candles".split(",")
WHEN = "at dawn,before noon,after the tide turns,each evening,on the first day of the month,in heavy fog".split(",")
PROMPT_QUESTIONS = [
    "In one short sentence: who records the lamps?",
    "In one short sentence: what happens in heavy fog?",
    "Name one thing the clerk checks.",
    "Which rule mentions the bells?",
    "What is counted each evening?",
    "Summarise the first rule in five words.",
    "Who inspects the crates, and when?",
    "Give one rule about the maps.",
    "What does the steward store?",
    "Which task is done at dawn?",
    "Name two things that are labelled.",
    "What must every visitor do?",
    "Which rule is about candles?",
    "Who repairs the sails?",
    "What is measured before noon?",
    "Give the last rule in your own words.",
]


def system_prompt_words(variant: int, n_words: int) -> list[str]:
    """Deterministic house rules, one variant per number: the same words on every run, a first word
    of their own for each variant (up to len(OPENERS)), then rules drawn from a generator seeded
    by the variant."""
    import random

    rng = random.Random(variant)
    words = f"{OPENERS[variant % len(OPENERS)]} house rules, variant {variant}.".split()
    k = 0
    while len(words) < n_words:
        k += 1
        rule = f"Rule {k}: {rng.choice(SUBJECTS)} {rng.choice(VERBS)} the {rng.choice(THINGS)} {rng.choice(WHEN)}"
        rule += f", and {rng.choice(SUBJECTS)} {rng.choice(VERBS)} the {rng.choice(THINGS)} {rng.choice(WHEN)}."
        words += rule.split()
    return words[:n_words]


def fit_to_tokens(words: list[str], target: int, count: Callable[[str], int]) -> tuple[str, int]:
    """The longest prefix of ``words`` (joined by spaces) that is at most ``target`` tokens, by
    bisection (token counts grow with the words); the text and its count."""
    lo, hi = 0, len(words)
    if count(" ".join(words)) <= target:
        lo = hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(" ".join(words[:mid])) <= target:
            lo = mid
        else:
            hi = mid - 1
    text = " ".join(words[:lo])
    return text, count(text)


def system_prompt(variant: int, target: int, count: Callable[[str], int]) -> tuple[str, int]:
    """A system prompt of at most ``target`` tokens (as ``count`` counts them), its count."""
    n = 2 * target  # more words than tokens are needed: every word is at least one token
    return fit_to_tokens(system_prompt_words(variant, n), target, count)


def chat_bodies(system: str, questions: list[str], max_tokens: int) -> list[dict[str, Any]]:
    """One streamed chat request per question, all with the same system prompt, greedy, of
    at most ``max_tokens`` tokens, with ``ignore_eos``."""
    base: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True}
    base["stream_options"] = {"include_usage": True}
    return [
        {**base, "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]} for q in questions
    ]


def bench_prompt(cfg: dict[str, Any], res: dict[str, Any]) -> None:
    import pyllama

    slots, n_ctx, target, max_tokens = cfg["slots"], cfg["prompt_n_ctx"], cfg["prompt_tokens"], cfg["prompt_max_tokens"]
    vocab = pyllama.Model(str(cfg["gemma"]), vocab_only=True)

    def count(text: str) -> int:
        return len(vocab.tokenize(text, add_special=False, parse_special=False))

    # Repetition r uses variants 3r (the concurrent chats), 3r + 1 (the single long prompt) and 3r + 2
    # (the users arriving in waves).
    prompts = [system_prompt(v, target, count) for v in range(3 * cfg["reps"])]
    questions = [PROMPT_QUESTIONS[i % len(PROMPT_QUESTIONS)] for i in range(slots)]
    n_users, wave, interval = cfg["users"], cfg["users_wave"], cfg["users_interval"]
    user_questions = [f"User {i + 1} asks: {PROMPT_QUESTIONS[i % len(PROMPT_QUESTIONS)]}" for i in range(n_users)]
    commands = server_commands(cfg, n_ctx, lcp=False)
    logs = refs.WORK / "logs" / "prompt"

    def make_server(name: str, tag: str) -> server_bench.Server:
        port = server_bench.free_port()
        argv = [a.replace("{port}", str(port)) for a in commands[name]]
        return server_bench.Server(name, argv, port, logs / f"{name}-{tag}.log")

    # The warm-up prompt is token ids without BOS: every measured chat starts with BOS (Gemma's
    # template), so the warm-up leaves no prefix in any slot that a measured request could reuse.
    warm_ids = vocab.tokenize("Warm up.", add_special=False, parse_special=False)
    if warm_ids[0] == vocab.token_bos:
        raise RuntimeError("the warm-up prompt must not start with BOS")
    warmup = {"prompt": warm_ids, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
    log(f"prompt: {', '.join(commands)}; {slots} chats with a {target}-token system prompt, {cfg['reps']} repetitions")
    out: dict[str, Any] = {
        "slots": slots,
        "n_ctx": n_ctx,
        "max_tokens": max_tokens,
        "reps": cfg["reps"],
        "cold": "restart",
        "target_tokens": target,
        "system_tokens": [n for _, n in prompts[0::3]],
        "single_tokens": [n for _, n in prompts[1::3]],
        "users_tokens": [n for _, n in prompts[2::3]],
        "questions": questions,
        "users": {"n": n_users, "wave": wave, "interval_s": interval},
        "body": {k: v for k, v in chat_bodies("", questions[:1], max_tokens)[0].items() if k != "messages"},
        "warmup": warmup,
    }
    out |= server_bench.bench_prompt(
        make_server,
        list(commands),
        cfg["reps"],
        lambda rep: chat_bodies(prompts[3 * rep][0], questions, max_tokens),
        lambda rep: chat_bodies(prompts[3 * rep + 1][0], questions[:1], max_tokens)[0],
        warmup,
        users=lambda rep: chat_bodies(prompts[3 * rep + 2][0], user_questions, max_tokens),
        wave=wave,
        interval=interval,
    )
    rounds = [chat_bodies(prompts[3 * rep][0], questions, max_tokens) for rep in range(cfg["reps"])]
    out["solo"] = solo_replies(cfg, rounds)
    res["prompt"] = out


def solo_replies(cfg: dict[str, Any], rounds: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    """The truth for the concurrent chats: each body's greedy reply alone, on a Llama of one sequence
    that evaluates its whole prompt afresh (reset before each; no cache), in this process; with each
    token's text and the margin between its two best logprobs (a batched run may part at a near-tie)."""
    import pyllama

    out = []
    with pyllama.Llama(str(cfg["gemma"]), n_ctx=cfg["prompt_n_ctx"] // cfg["slots"], n_threads=cfg["threads"]) as llm:
        for bodies in rounds:
            replies = []
            for body in bodies:
                llm.reset()
                reply = llm.chat(
                    body["messages"], max_tokens=body["max_tokens"], temperature=0.0, logprobs=True, top_logprobs=2
                )
                content = (reply["choices"][0].get("logprobs") or {}).get("content") or []
                margins = [
                    c["top_logprobs"][0]["logprob"] - c["top_logprobs"][1]["logprob"]
                    if len(c["top_logprobs"]) > 1
                    else float("inf")
                    for c in content
                ]
                replies.append(
                    {
                        "text": reply["choices"][0]["message"]["content"] or "",
                        "pieces": [c["token"] for c in content],
                        "margins": margins,
                    }
                )
            out.append(replies)
    log(f"prompt: solo replies of {sum(len(r) for r in rounds)} chats computed")
    return out


# --- 6. an image in the prompt ---------------------------------------------------------------------

MEDIA_PROMPT = "Describe this."


def mtmd_cli_times(stderr: str) -> tuple[list[float], float]:
    """llama-mtmd-cli's own figures: each media encode (``mtmd batch encoding done in N ms``), and its
    prompt evaluation (``llama_perf_context_print: prompt eval time = X ms``). llama.cpp times that from
    the first decode to the synchronisation before the first sample, so that for one turn it spans the
    image's encode and every decode of the prompt: the time to first token but for one sample."""
    enc = [float(x) for x in re.findall(r"mtmd batch encoding done in (\d+) ms", stderr)]
    ev = re.search(r"prompt eval time =\s+([0-9.]+) ms", stderr)
    if not enc or not ev:
        raise RuntimeError("llama-mtmd-cli printed no timings:\n" + stderr[-2000:])
    return enc, float(ev.group(1))


def bench_media(cfg: dict[str, Any], res: dict[str, Any]) -> None:
    """The tiny llama with a random Gemma 3 vision projector and llama.cpp's test image, pyllama
    against llama-mtmd-cli's own timings, alternating in rounds: the time to first token of a fresh
    process's first prompt, and the encode of the image again and again in one process (the CLI's
    chat mode, several images in one message; the first encode of each process is not kept)."""
    cli, image = refs.mtmd_cli_path(), refs.LLAMA_CPP / "tools" / "mtmd" / "test-1.jpeg"
    model, mmproj, threads = str(cfg["tiny"]), str(refs.tiny_mmproj_path()), str(cfg["threads"])
    common = [str(cli), "-m", model, "--mmproj", mmproj, "-n", "1", "--temp", "0", "-t", threads, "-tb", threads]
    common += ["-c", "4096", "--chat-template", "chatml", "-lv", "4"]
    one_turn = [*common, "--image", str(image), "-p", MEDIA_PROMPT]
    # Several images in one message, each encoded on its own (the text of Gemma 3's image wrapping
    # parts them), in one process. Each is a copy of the image with another byte after its end-of-image
    # marker (the same pixels, another id). (The CLI's chat mode cannot do this turn after turn: it
    # finds the last turn's embeddings for a new chunk at a freed chunk's address.)
    copies = refs.WORK / "media"
    copies.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(cfg["reps"] + 1):
        names.append(copies / f"image-{i}.jpeg")
        names[-1].write_bytes(image.read_bytes() + bytes([i]))
    turns = "".join(f"/image {name}\n" for name in names) + f"{MEDIA_PROMPT}\n/exit\n"
    marker = "<__media__>"
    spec = {
        "model": model,
        "mmproj": mmproj,
        "image": str(image),
        "prompt": f"<|im_start|>user\n{marker}{MEDIA_PROMPT}<|im_end|>\n<|im_start|>assistant\n",
        "threads": cfg["threads"],
        "reps": cfg["reps"],
    }
    out: dict[str, Any] = {
        "llama-mtmd-cli": {"encode_ms": [], "ttft_ms": [], "peak_rss_mib": 0.0},
        "pyllama": {"encode_ms": [], "ttft_ms": [], "peak_rss_mib": 0.0},
        "argv": one_turn,
    }
    ref, mine = out["llama-mtmd-cli"], out["pyllama"]
    for rnd in range(cfg["rounds"]):
        log(f"media: round {rnd + 1}")
        for i in range(cfg["reps"] + 1):
            got = worker(sys.executable, "worker_pyllama.py", "media", {**spec, "what": "ttft"})
            r = run_measured(one_turn)
            if i:  # a first run of each round warms the page cache for both
                mine["ttft_ms"].append(got["ttft_ms"])
                ref["ttft_ms"].append(mtmd_cli_times(r["stderr"])[1])
            mine["n_prompt"], mine["n_image_tokens"] = got["n_prompt"], got["n_image_tokens"]
            mine["peak_rss_mib"] = max(mine["peak_rss_mib"], got["peak_rss_mib"])
            ref["peak_rss_mib"] = max(ref["peak_rss_mib"], r["peak_rss_mib"])
        mine["encode_ms"] += worker(sys.executable, "worker_pyllama.py", "media", {**spec, "what": "encode"})[
            "encode_ms"
        ]
        r = run_measured_stdin(common, turns)
        ref["encode_ms"] += mtmd_cli_times(r["stderr"])[0][1:]
    res["media"] = out


# --- 7. speculative decoding and predicted outputs ------------------------------------------------

NGRAM_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")

# About 150 words; the copy-heavy prompt is the passage, then its first 20 words again.
SPEC_PASSAGE = (
    "The lighthouse on the northern cliffs was built in 1871 by a company of stonemasons who came "
    "from the southern quarries with their families, their tools and a herd of goats. For two years "
    "they cut granite blocks from the hillside, dragged them up the slope on wooden sledges and laid "
    "them in rings, each ring a little narrower than the one below it. The keeper's cottage was "
    "finished first, so that the masons had somewhere dry to sleep when the winter storms came in "
    "from the sea. When the tower was done, a lens of polished glass arrived by ship from the capital, "
    "packed in straw inside a crate as large as a wagon. It took eleven men a whole day to carry it up "
    "the spiral stairs. On the first night the lamp was lit, the fishermen of the harbour stood on the "
    "quay and cheered, and the keeper wrote in his log that the light could be seen for twenty miles."
)

# The file of the editing request (about 400 tokens) and the one change asked for.
SPEC_FILE = "\n\n".join(
    [
        "Harbour office notes for the spring season",
        (
            "The harbour office opens at seven in the morning and closes at six in the evening from the "
            "first of April to the end of September. Outside those hours, the night watchman keeps the "
            "keys to the main gate and the fuel store. Boats that arrive after dark should tie up at the "
            "visitors' pontoon and report to the office the next morning."
        ),
        (
            "Mooring fees are paid by the week or by the season. A boat under eight metres pays twelve "
            "pounds a week, and a larger boat pays twenty. Fees for the season are due before the end of "
            "April; boats that have not paid by then lose their place on the list. Fishing boats "
            "registered in the town pay no mooring fees, but they must still sign the register each "
            "month."
        ),
        (
            "The slipway may be used at any state of the tide except the two hours either side of low "
            "water, when the lower end is too shallow for most trailers. Please do not leave cars or "
            "trailers on the slipway itself. The car park behind the fish market has space for twenty "
            "trailers, and the key to its barrier can be borrowed from the office."
        ),
        (
            "Fresh water is available from the taps on the north quay. Diesel can be bought from the fuel "
            "store on weekday mornings; ask at the office and someone will come down with you. Petrol is "
            "not sold in the harbour, but the garage on the high street is open every day."
        ),
        (
            "The harbour master holds a meeting for all berth holders on the first Monday of every month, "
            "in the room above the office. The meetings begin at half past seven and usually last an "
            "hour. Anyone who cannot come may send questions in writing beforehand."
        ),
        (
            "In an emergency, call the coastguard first and then the harbour office. The lifeboat station "
            "is at the end of the south pier, and its crew trains there every Thursday evening."
        ),
    ]
)
SPEC_CHANGE = ("first Monday of every month", "first Tuesday of every month")

SPEC_TOPICS = ("a clockmaker who finds a strange key", "a lighthouse keeper and a storm", "a fox who learns to read")
SPEC_TOPICS += ("a baker at dawn",)


def copy_prompt(passage: str = SPEC_PASSAGE, n_words: int = 20) -> str:
    """The passage, then its first words again: a greedy continuation repeats the passage."""
    return passage + "\n\n" + " ".join(passage.split()[:n_words])


def edit_prompt(text: str = SPEC_FILE) -> str:
    """A file-editing request a base model answers by copying the file: the file in a fence, then the
    header of the edited file and an opening fence. The reply ends at its closing fence (a stop string)."""
    return (
        f"Here is a file, notes.txt:\n\n```\n{text}\n```\n\n"
        "Here is notes.txt after the edit (Monday changed to Tuesday; every other line unchanged):\n\n```\n"
    )


def story_prompt(topic: str) -> str:
    return f"Write a short story about {topic}. Once upon a time,"


SPEC_SIMPLE = {
    "encoded": r"encoded\s+(\d+) tokens in\s+([\d.]+) seconds",
    "decoded": r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds",
    "n_drafted": r"n_drafted\s*=\s*(\d+)",
    "n_accept": r"n_accept\s*=\s*(\d+)",
}


def parse_spec_simple(text: str) -> dict[str, float]:
    """llama-speculative-simple's closing lines: the prompt's tokens and seconds, the tokens it
    generated and the seconds of its decode loop, the draft tokens it evaluated and accepted."""
    got: dict[str, float] = {}
    for key, pattern in SPEC_SIMPLE.items():
        m = re.findall(pattern, text)
        if not m:
            raise RuntimeError(f"llama-speculative-simple printed no '{key}' line:\n{text[-2000:]}")
        if isinstance(m[-1], tuple):
            got[f"{key}_tokens"], got[f"{key}_s"] = int(m[-1][0]), float(m[-1][1])
        else:
            got[key] = int(m[-1])
    return got


def generated_text(stdout: str, prompt: str) -> str:
    """What a llama.cpp tool printed after the prompt (both print the prompt, then each token's text)."""
    at = stdout.find(prompt)
    if at < 0:
        raise RuntimeError(f"the tool's output does not hold the prompt:\n{stdout[:2000]}")
    return stdout[at + len(prompt) :]


def bench_spec(cfg: dict[str, Any], res: dict[str, Any]) -> None:
    """Speculative decoding with llama.cpp's n-gram types, and OpenAI's predicted outputs, against the
    same greedy decode without drafts, alternating in rounds; llama.cpp's llama-speculative-simple
    against llama-completion on the copy-heavy prompt."""
    import pyllama

    tools, threads, reps, n_ctx = cfg["tools"], cfg["threads"], cfg["reps"], 2048
    model = str(cfg["gemma"])
    vocab = pyllama.Model(model, vocab_only=True)
    base = {"model": model, "threads": threads, "reps": reps, "n_ctx": n_ctx}
    copy = copy_prompt()
    n_copy = cfg["spec_tokens"]
    copy_kwargs = {"max_tokens": n_copy, "ignore_eos": True}
    arms = [{"name": "plain"}] + [{"name": t, "speculative": t} for t in NGRAM_TYPES]
    common = ["-m", model, "-p", copy, "-n", str(n_copy), "--ignore-eos", "--temp", "0", "--seed", "1"]
    common += ["-t", str(threads), "-tb", str(threads), "-c", str(n_ctx), "-b", "2048", "-ub", "512"]
    ref_argv = {
        "llama-completion": [str(tools["llama-completion"]), *common, "-no-cnv"],
        "llama-speculative-simple": [str(tools["llama-speculative-simple"]), *common, "--spec-type", "ngram-simple"],
    }
    out: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["python", "benchmarks/run.py", *sys.argv[1:]]),
        "load": [],  # the 1-minute load average before each process
        "n_ctx": n_ctx,
        "copy": {"prompt": copy, "max_tokens": n_copy, "passage_words": len(SPEC_PASSAGE.split()), "argv": ref_argv},
    }
    cp = out["copy"]
    refs_out: dict[str, Any] = {name: {"decode_tps": [], "text": [], "runs": []} for name in ref_argv}
    for rnd in range(cfg["rounds"]):
        log(f"spec, round {rnd + 1}/{cfg['rounds']}: copy-heavy prompt, pyllama: {', '.join(a['name'] for a in arms)}")
        spec = {**base, "arms": arms, "prompts": [copy], "kwargs": copy_kwargs, "truth": rnd == 0}
        if rnd == 0:
            spec["verify_cost"] = [1, 16, 32, 48, 64]
        out["load"].append(os.getloadavg()[0])
        got = worker(sys.executable, "worker_pyllama.py", "spec", spec)
        if "truth" in got:
            cp["truth"] = got.pop("truth")
        if "verify_ms" in got:
            cp["verify_ms"] = got.pop("verify_ms")
        if "batch_check" in got:
            cp["batch_check"] = got.pop("batch_check")
        merge(cp, {"pyllama": got["arms"], "pyllama_peak_rss_mib": got["peak_rss_mib"]})
        names = list(ref_argv) if rnd % 2 == 0 else list(ref_argv)[::-1]
        for i in range(reps + 1):
            for name in names:
                log(f"spec, round {rnd + 1}/{cfg['rounds']}: {name} ({i}/{reps})")
                out["load"].append(os.getloadavg()[0])
                r = run_measured(ref_argv[name])
                if not i:
                    continue
                text = r["stderr"] + r["stdout"]
                if name == "llama-completion":
                    perf = parse_perf(text)
                    # the decode loop: its decodes and its samples (llama-speculative-simple's loop times both)
                    tps = perf["eval_runs"] / ((perf["eval_ms"] + perf["sampling_ms"]) / 1000)
                    figures = {**perf, "prompt_tokens": int(re.findall(PERF["prompt_eval_ms"], text)[-1][1])}
                else:
                    figures = parse_spec_simple(text)
                    tps = figures["decoded_tokens"] / figures["decoded_s"]
                e = refs_out[name]
                e["decode_tps"].append(tps)
                e["text"].append(generated_text(r["stdout"], copy))
                e["runs"].append(figures)
                e["peak_rss_mib"] = max(e.get("peak_rss_mib", 0.0), r["peak_rss_mib"])
    cp["llama.cpp"] = refs_out

    # The best n-gram type on the copy-heavy prompt (the highest median decode rate) for the free text.
    rates = {t: statistics.median(cp["pyllama"][t]["decode_tps"]) for t in NGRAM_TYPES}
    best = max(rates, key=lambda t: rates[t])
    out["best"] = best

    # Predicted outputs: an editing request with the file as the prediction.
    n_file = len(vocab.tokenize(SPEC_FILE, add_special=False, parse_special=False))
    edit = edit_prompt()
    ed: dict[str, Any] = {"prompt": edit, "file": SPEC_FILE, "file_tokens": n_file, "change": list(SPEC_CHANGE)}
    ed["kwargs"] = {"max_tokens": n_file + 64, "stop": ["```"]}
    out["edit"] = ed
    edit_arms = [{"name": "plain"}, {"name": "prediction", "prediction": SPEC_FILE}]
    # Free text: story prompts at temperature 0 with the best type on and off. Gemma 3 270M falls into
    # loops at temperature 0 (which the n-gram types then draft); a repetition penalty keeps the text
    # from repeating itself, so that there is nothing to draft.
    free_kwargs = {"max_tokens": cfg["spec_free_tokens"], "ignore_eos": True, "repeat_penalty": 1.3}
    prompts = [story_prompt(t) for t in SPEC_TOPICS]
    fr: dict[str, Any] = {"type": best, "prompts": prompts, "kwargs": free_kwargs}
    out["free"] = fr
    for rnd in range(cfg["rounds"]):
        log(f"spec, round {rnd + 1}/{cfg['rounds']}: editing request, with and without the prediction")
        spec = {**base, "arms": edit_arms, "prompts": [edit], "kwargs": ed["kwargs"], "truth": rnd == 0}
        out["load"].append(os.getloadavg()[0])
        got = worker(sys.executable, "worker_pyllama.py", "spec", spec)
        if "truth" in got:
            ed["truth"] = got.pop("truth")
        merge(ed, {"pyllama": got["arms"], "pyllama_peak_rss_mib": got["peak_rss_mib"]})
        log(f"spec, round {rnd + 1}/{cfg['rounds']}: free text, {best} on and off")
        free_arms = [{"name": "plain"}, {"name": best, "speculative": best}]
        n_free = cfg["spec_free_reps"]
        spec = {**base, "reps": n_free, "arms": free_arms, "prompts": prompts, "kwargs": free_kwargs}
        spec["prompt_offset"] = rnd * (n_free + 1)
        out["load"].append(os.getloadavg()[0])
        got = worker(sys.executable, "worker_pyllama.py", "spec", spec)
        merge(fr, {"pyllama": {"plain": got["arms"]["plain"], "best": got["arms"][best]}})
        fr["pyllama_peak_rss_mib"] = max(fr.get("pyllama_peak_rss_mib", 0.0), got["peak_rss_mib"])

    # How much of the file the reply copies (its tokens that line up with the file's, by difflib).
    file_ids = vocab.tokenize(SPEC_FILE, add_special=False, parse_special=False)
    reply = ed["truth"]["text"] if "truth" in ed else ed["pyllama"]["plain"]["text"][0]
    reply_ids = vocab.tokenize(reply, add_special=False, parse_special=False)
    ed["copied"] = copied_tokens(file_ids, reply_ids)
    ed["reply_tokens"] = len(reply_ids)
    ed["changed"] = SPEC_CHANGE[1] in reply and SPEC_CHANGE[0] not in reply
    log(
        f"spec: the reply copies {ed['copied']} of the file's {len(file_ids)} tokens ({len(reply_ids)} tokens); "
        f"the change was {'made' if ed['changed'] else 'not made'}"
    )
    res["spec"] = out


def copied_tokens(a: list[int], b: list[int]) -> int:
    """How many tokens of ``a`` appear, in order, in ``b`` (difflib's matching blocks)."""
    import difflib

    return sum(m.size for m in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks())


# --- main ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "system": f"{platform.system()} {platform.release()}"}


SECTIONS = {
    "speed": bench_speed,
    "overhead": bench_overhead,
    "ttft": bench_ttft,
    "server": bench_server,
    "prompt": bench_prompt,
    "media": bench_media,
    "spec": bench_spec,
}

# The sections that measure llama-cpp-python too.
LCP_SECTIONS = {"speed", "overhead", "ttft", "server"}
# The llama.cpp tools each section runs (only those are built).
SECTION_TOOLS = {
    "speed": ("llama-bench",),
    "overhead": ("llama-completion",),
    "server": ("llama-server",),
    "prompt": ("llama-server",),
    "spec": ("llama-completion", "llama-speculative-simple"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help="sections to run: " + ", ".join(SECTIONS))
    ap.add_argument("--reps", type=int, default=5, help="measured repetitions (a warm-up run comes first)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds that alternate the implementations (pooled)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for everything (default: pyllama's)")
    ap.add_argument("--levels", default="1,4,8,16", help="concurrent clients for the server section")
    ap.add_argument("--slots", type=int, default=8, help="parallel slots of each server")
    ap.add_argument("--prompt-tokens", type=int, default=1452, help="system prompt tokens of the prompt-heavy section")
    ap.add_argument("--users", type=int, default=32, help="users of the prompt-heavy section's wave load")
    ap.add_argument("--users-interval", type=float, default=1.0, help="seconds between its waves of 4 users")
    ap.add_argument("--no-llama-cpp-python", action="store_true", help="leave llama-cpp-python out")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the reference tools and venv")
    ap.add_argument("--report", action="store_true", help="only rewrite docs/benchmarks.md's sections from the results")
    ap.add_argument("--results", type=Path, default=RESULTS, help="results (default benchmarks/.work/results.json)")
    ap.add_argument("--doc", type=Path, default=report.DOC, help="the page written (default docs/benchmarks.md)")
    args = ap.parse_args()
    results: Path = args.results

    if args.report:
        res = json.loads(results.read_text())
        # the sections the results hold; the page keeps the others as they are
        report.write(res, args.doc, only=[k for k in report.SECTIONS if k in res])
        return 0
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s): {', '.join(sorted(unknown))}")

    import pyllama

    cfg: dict[str, Any] = {
        "tools": refs.build_llama_cpp_tools(
            args.rebuild, tuple(dict.fromkeys(t for s in sections for t in SECTION_TOOLS.get(s, ())))
        ),
        "lcp": None
        if args.no_llama_cpp_python or not set(sections) & LCP_SECTIONS
        else str(refs.ensure_llama_cpp_python(args.rebuild)),
        "gemma": refs.gemma_path(),
        "tiny": refs.tiny_model_path(),
        "reps": args.reps,
        "n_overhead": 256,
        "levels": [int(x) for x in args.levels.split(",")],
        "slots": args.slots,
        "server_n_ctx": 8192,
        "server_max_tokens": 64,
        "server_reps": 3,
        "server_rounds": 2,
        "prompt_n_ctx": 16384,
        "prompt_tokens": args.prompt_tokens,
        "prompt_max_tokens": 16,
        "users": args.users,
        "users_wave": 4,
        "users_interval": args.users_interval,
        "rounds": args.rounds,
        "spec_tokens": 160,
        "spec_free_tokens": 128,
        "spec_free_reps": 3 * args.reps,  # the pairs of the free text (cheap runs, a small difference)
    }
    cfg["threads"] = args.threads or default_threads(cfg["tiny"])
    res: dict[str, Any] = json.loads(results.read_text()) if results.exists() else {}
    res["meta"] = {
        **machine(),
        "date": datetime.date.today().isoformat(),
        "threads": cfg["threads"],
        "pyllama": pyllama.__version__,
        "llama_cpp_commit": pyllama.LLAMA_CPP_COMMIT if hasattr(pyllama, "LLAMA_CPP_COMMIT") else "4df29be4f",
        "cpu_flags": refs.cpu_flags(),
        "cmake_args": " ".join(refs.EXTRA_CMAKE_ARGS),
        "gpus": [
            f"{d['description']} ({d['memory_total'] // 2**20:,} MiB)" for d in pyllama.devices() if d["type"] == "gpu"
        ],
        "models": {"gemma": cfg["gemma"].name, "tiny": cfg["tiny"].name},
        "reps": args.reps,
        "rounds": args.rounds,
    }
    for s in sections:
        t = time.perf_counter()
        SECTIONS[s](cfg, res)
        res.setdefault("took_s", {})[s] = round(time.perf_counter() - t, 1)
        results.write_text(json.dumps(res, indent=1, default=str))
    report.write(res, args.doc, only=sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
