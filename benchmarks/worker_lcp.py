"""llama-cpp-python's side of the in-process benchmarks, the same tasks as worker_pyllama.py.

Runs in the virtual environment refs.py makes (llama-cpp-python==0.3.35 built from source with
the same CPU flags), one task per process, and prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import llama_cpp
import numpy as np

now = time.perf_counter


def load(path: str, n_ctx: int, threads: int, chat_format: str | None = None) -> llama_cpp.Llama:
    return llama_cpp.Llama(
        chat_format=chat_format,
        model_path=path,
        n_ctx=n_ctx,
        n_batch=2048,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


def random_prompt(llm: llama_cpp.Llama, n: int, rng: np.random.Generator) -> list[int]:
    tokens = rng.integers(0, llm.n_vocab(), n).tolist()
    if llm._model.add_bos_token():
        tokens[0] = llm.token_bos()
    return tokens


def speed(spec: dict[str, Any]) -> dict[str, Any]:
    path, threads, reps = spec["model"], spec["threads"], spec["reps"]
    n_pp, n_tg = spec.get("n_prompt", 512), spec.get("n_gen", 128)
    rng = np.random.default_rng(0)
    out: dict[str, list[float]] = {}
    tokens_out: dict[str, list[int]] = {}

    llm = load(path, n_pp, threads)
    samples = []
    for i in range(reps + 1):
        llm.reset()
        prompt = random_prompt(llm, n_pp, rng)
        t = now()
        llm.eval(prompt)
        dt = now() - t
        if i:
            samples.append(n_pp / dt)
    out["pp_eval"] = samples
    llm.close()

    llm = load(path, n_tg, threads)
    bos = llm.token_bos() if llm._model.add_bos_token() else 0
    samples = []
    for i in range(reps + 1):
        llm.reset()
        n = 0
        t = now()
        for _ in llm.generate([bos], temp=0.0, reset=True):
            n += 1
            if n == n_tg:
                break
        dt = now() - t
        if i:
            samples.append(n_tg / dt)
    out["tg_generate_greedy"] = samples
    llm.close()

    llm = load(path, max(n_pp + 8, 512), threads, spec.get("chat_template"))
    samples = []
    for i in range(reps + 1):
        prompt = random_prompt(llm, n_pp, rng)
        t = now()
        llm.create_completion(prompt, max_tokens=1, temperature=0)
        dt = now() - t
        if i:
            samples.append(n_pp / dt)
    out["pp_create_completion"] = samples

    samples, counts = [], []
    for i in range(reps + 1):
        llm.reset()
        t = now()
        r = llm.create_completion(spec["prompt"], max_tokens=n_tg, temperature=0)
        dt = now() - t
        if i:
            samples.append(r["usage"]["completion_tokens"] / dt)
            counts.append(r["usage"]["completion_tokens"])
    out["tg_create_completion"] = samples
    tokens_out["tg_create_completion"] = counts

    # As for pyllama: the end-of-generation tokens banned, so that every reply has n_tg tokens.
    eog = {t: -100.0 for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(llm._model.vocab, t)}
    samples, counts = [], []
    for i in range(reps + 1):
        messages = [{"role": "user", "content": f"{i}. {spec['prompt']}"}]
        t = now()
        r = llm.create_chat_completion(messages, max_tokens=n_tg, temperature=0, logit_bias=eog)
        dt = now() - t
        if i:
            samples.append(r["usage"]["completion_tokens"] / dt)
            counts.append(r["usage"]["completion_tokens"])
    out["tg_create_chat_completion"] = samples
    tokens_out["tg_create_chat_completion"] = counts
    llm.close()
    return {"samples": out, "tokens": tokens_out}


def overhead(spec: dict[str, Any]) -> dict[str, Any]:
    """create_completion with llama.cpp's default sampler settings. llama-cpp-python has no
    ignore_eos, so the tokens each run generated are recorded with its time."""
    path, threads, reps, n = spec["model"], spec["threads"], spec["reps"], spec["n"]
    llm = load(path, spec["n_ctx"], threads)
    sampling = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0, seed=spec["seed"])
    out: dict[str, list[float]] = {"complete": [], "complete_stream": []}
    tokens: dict[str, list[int]] = {"complete": [], "complete_stream": []}
    for i in range(reps + 1):
        prompt = spec["prompts"][i % len(spec["prompts"])]
        t = now()
        r = llm.create_completion(prompt, max_tokens=n, **sampling)
        dt = now() - t
        got = r["usage"]["completion_tokens"]
        # The same prompt and seed stream the same tokens (the count is the non-streamed one's).
        t = now()
        for _ in llm.create_completion(prompt, max_tokens=n, stream=True, **sampling):
            pass
        dt_stream = now() - t
        if i:
            out["complete"].append(dt)
            tokens["complete"].append(got)
            out["complete_stream"].append(dt_stream)
            tokens["complete_stream"].append(got)
    llm.close()
    return {"seconds": out, "tokens": tokens}


def ttft(spec: dict[str, Any]) -> dict[str, Any]:
    path, threads, reps = spec["model"], spec["threads"], spec["reps"]
    history, follow_ups = spec["history"], spec["follow_ups"]
    llm = load(path, spec["n_ctx"], threads, spec.get("chat_template"))
    first = llm.create_chat_completion(history, max_tokens=spec["reply_tokens"], temperature=0)
    reply = first["choices"][0]["message"]["content"]
    conversation = [*history, {"role": "assistant", "content": reply}]
    out: dict[str, Any] = {"second_turn": [], "prompt_tokens": []}
    for i in range(reps + 1):
        messages = [*conversation, {"role": "user", "content": follow_ups[i % len(follow_ups)]}]
        llm.create_chat_completion(history, max_tokens=spec["reply_tokens"], temperature=0)
        t = now()
        r = llm.create_chat_completion(messages, max_tokens=1, temperature=0)
        dt = now() - t
        if i:
            out["second_turn"].append(dt)
            out["prompt_tokens"].append(r["usage"]["prompt_tokens"])
    llm.close()
    return out


TASKS = {"speed": speed, "overhead": overhead, "ttft": ttft}

if __name__ == "__main__":
    task, spec = sys.argv[1], json.loads(sys.argv[2])
    result = TASKS[task](spec)
    result["version"] = llama_cpp.__version__
    print(json.dumps(result))
