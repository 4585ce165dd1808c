"""pyllama's side of the in-process benchmarks; run by run.py, one task per process.

    python benchmarks/worker_pyllama.py TASK '{"model": ..., "threads": 2, "reps": 5, ...}'

prints one JSON object with the raw samples (run.py takes the medians). Every task does a warm-up
that is not counted.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

import pyllama

now = time.perf_counter


def random_prompt(model: pyllama.Model, n: int, rng: np.random.Generator) -> list[int]:
    """Random token ids as llama-bench makes them: BOS first when the model adds one."""
    tokens = rng.integers(0, model.n_vocab, n).tolist()
    if model.add_bos and model.token_bos is not None:
        tokens[0] = model.token_bos
    return tokens


def first_token(model: pyllama.Model) -> int:
    return model.token_bos if model.add_bos and model.token_bos is not None else 0


def core_speed(
    model: pyllama.Model, threads: int, reps: int, n_pp: int = 512, n_tg: int = 128
) -> dict[str, list[float]]:
    """pp (one Context.decode of n_pp random tokens, logits for the last) and tg (the C++ generation
    core, one sequence, greedy: n_tg decodes and n_tg samples) as llama-bench runs them (n_ctx = n_pp
    or n_tg, n_batch 2048, n_ubatch 512): tokens/s of each repetition after a warm-up."""
    rng = np.random.default_rng(0)
    cparams = dict(n_batch=2048, n_ubatch=512, n_threads=threads, n_threads_batch=threads)
    out: dict[str, list[float]] = {"pp_context_decode": [], "tg_generator_greedy": []}
    with pyllama.Context(model, n_ctx=n_pp, **cparams) as ctx:
        for i in range(reps + 1):
            ctx.memory_clear(False)
            batch = pyllama.Batch.from_tokens(random_prompt(model, n_pp, rng))
            t = now()
            ctx.decode(batch)
            dt = now() - t
            if i:
                out["pp_context_decode"].append(n_pp / dt)
    greedy = pyllama.Sampler(model, greedy=True)
    with pyllama.Context(model, n_ctx=n_tg, **cparams) as ctx:
        gen = pyllama.Engine(ctx)
        for i in range(reps + 1):
            gen.reset()
            greedy.reset()
            g = gen.submit([first_token(model)], greedy, max_tokens=n_tg, ignore_eos=True)
            t = now()
            g.run()
            dt = now() - t
            assert g.n_completion == n_tg, g.n_completion
            if i:
                out["tg_generator_greedy"].append(n_tg / dt)
    return out


def speed(spec: dict[str, Any]) -> dict[str, Any]:
    """pp512 and tg128 as llama-bench runs them (n_ctx = n_prompt or n_gen, n_batch 2048,
    n_ubatch 512), through the low-level objects and through Llama.complete/chat."""
    path, threads, reps = spec["model"], spec["threads"], spec["reps"]
    n_pp, n_tg = spec.get("n_prompt", 512), spec.get("n_gen", 128)
    model = pyllama.Model(path)
    out: dict[str, list[float]] = core_speed(model, threads, reps, n_pp, n_tg)
    rng = np.random.default_rng(1)
    cparams = dict(n_batch=2048, n_ubatch=512, n_threads=threads, n_threads_batch=threads)
    greedy = pyllama.Sampler(model, greedy=True)
    with pyllama.Context(model, n_ctx=n_tg, **cparams) as ctx:
        # tg: the same in a Python loop: Context.decode + Sampler.sample per token.
        samples = []
        for i in range(reps + 1):
            ctx.memory_clear(False)
            greedy.reset()
            tok = first_token(model)
            t = now()
            for pos in range(n_tg):
                ctx.decode(pyllama.Batch.from_tokens([tok], pos0=pos))
                tok = greedy.sample(ctx)
                greedy.accept(tok)
            dt = now() - t
            if i:
                samples.append(n_tg / dt)
        out["tg_python_loop_greedy"] = samples

    # Llama: the same context settings; pp through complete(max_tokens=1) on a fresh random
    # prompt each time (so nothing is reused but BOS), tg through complete/chat with greedy
    # sampling and a short prompt, timed end to end.
    llm = pyllama.Llama(
        path,
        n_ctx=max(n_pp + 8, 512),
        n_batch=2048,
        n_ubatch=512,
        n_threads=threads,
        chat_template=spec.get("chat_template"),
    )
    samples = []
    for i in range(reps + 1):
        prompt = random_prompt(model, n_pp, rng)
        t = now()
        r = llm.complete(prompt, max_tokens=1, temperature=0)
        dt = now() - t
        evaluated = r["usage"]["prompt_tokens"] - r["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
        if i:
            samples.append(evaluated / dt)
    out["pp_llama_complete"] = samples

    prompt_text = spec["prompt"]
    samples = []
    for i in range(reps + 1):
        t = now()
        r = llm.complete(prompt_text, max_tokens=n_tg, temperature=0, ignore_eos=True)
        dt = now() - t
        assert r["usage"]["completion_tokens"] == n_tg
        if i:
            samples.append(n_tg / dt)
    out["tg_llama_complete"] = samples

    eog = {t: -100.0 for t in eog_tokens(model)}
    samples = []
    for i in range(reps + 1):
        # A new conversation each time: only the template's first tokens are reused.
        messages = [{"role": "user", "content": f"{i}. {prompt_text}"}]
        t = now()
        r = llm.chat(messages, max_tokens=n_tg, temperature=0, logit_bias=eog)
        dt = now() - t
        assert r["usage"]["completion_tokens"] == n_tg, r["usage"]
        if i:
            samples.append(n_tg / dt)
    out["tg_llama_chat"] = samples
    llm.close()
    return {"samples": out}


def eog_tokens(model: pyllama.Model) -> list[int]:
    return [t for t in range(model.n_vocab) if model.token_is_eog(t)]


def overhead(spec: dict[str, Any]) -> dict[str, Any]:
    """End-to-end time of Llama.complete for n tokens with llama.cpp's default sampler chain
    (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05), streamed and not."""
    path, threads, reps, n = spec["model"], spec["threads"], spec["reps"], spec["n"]
    llm = pyllama.Llama(path, n_ctx=spec["n_ctx"], n_threads=threads)
    out: dict[str, list[float]] = {"complete": [], "complete_stream": []}
    tokens: dict[str, list[int]] = {"complete": [], "complete_stream": []}
    for i in range(reps + 1):
        for mode in ("complete", "complete_stream"):
            prompt = spec["prompts"][i % len(spec["prompts"])]
            t = now()
            if mode == "complete":
                r = llm.complete(prompt, max_tokens=n, ignore_eos=True, seed=spec["seed"])
                got = r["usage"]["completion_tokens"]
            else:
                got = 0
                for chunk in llm.complete(prompt, max_tokens=n, ignore_eos=True, seed=spec["seed"], stream=True):
                    if chunk.get("usage"):
                        got = chunk["usage"]["completion_tokens"]
            dt = now() - t
            if i:
                out[mode].append(dt)
                tokens[mode].append(got)
    llm.close()
    return {"seconds": out, "tokens": tokens}


def ttft(spec: dict[str, Any]) -> dict[str, Any]:
    """Second-turn time to first token with a long history, against evaluating only the new
    turn's tokens on top of the history in a bare Context (and the whole prompt, for scale). The
    three are measured one after another in each repetition."""
    path, threads, reps = spec["model"], spec["threads"], spec["reps"]
    history, follow_ups = spec["history"], spec["follow_ups"]
    llm = pyllama.Llama(path, n_ctx=spec["n_ctx"], n_threads=threads, chat_template=spec.get("chat_template"))
    first = llm.chat(history, max_tokens=spec["reply_tokens"], temperature=0)
    reply = first["choices"][0]["message"]["content"]
    conversation = [*history, {"role": "assistant", "content": reply}]
    out: dict[str, Any] = {
        "second_turn": [],
        "new_turn_only": [],
        "whole_prompt": [],
        "prompt_and_cached": [],
        "first_turn_tokens": first["usage"]["prompt_tokens"],
    }
    model = llm.model
    greedy = pyllama.Sampler(model, greedy=True)
    ctx = pyllama.Context(model, n_ctx=llm.n_ctx(), n_threads=threads, n_threads_batch=threads)
    for i in range(reps + 1):
        messages = [*conversation, {"role": "user", "content": follow_ups[i % len(follow_ups)]}]
        # The first turn again (prompt and reply in the context), as after a real first turn.
        llm.chat(history, max_tokens=spec["reply_tokens"], temperature=0)
        t = now()
        r = llm.chat(messages, max_tokens=1, temperature=0)
        second = now() - t
        usage = r["usage"]
        n_cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)

        # The reference: exactly the tokens chat() evaluated, the reused part already in memory.
        tokens = llm._render(messages, False, 1)[1]
        assert len(tokens) == usage["prompt_tokens"]
        ctx.memory_clear()
        ctx.decode(pyllama.Batch.from_tokens(tokens[:n_cached], logits_last=False))
        t = now()
        ctx.decode(pyllama.Batch.from_tokens(tokens[n_cached:], pos0=n_cached))
        greedy.sample(ctx)
        only = now() - t

        ctx.memory_clear()
        t = now()
        ctx.decode(pyllama.Batch.from_tokens(tokens))
        greedy.sample(ctx)
        whole = now() - t
        if i:
            out["second_turn"].append(second)
            out["new_turn_only"].append(only)
            out["whole_prompt"].append(whole)
            out["prompt_and_cached"].append((usage["prompt_tokens"], n_cached))
    ctx.close()
    llm.close()
    return out


def media(spec: dict[str, Any]) -> dict[str, Any]:
    """One image in a prompt. ``ttft``: a fresh process set up as llama-mtmd-cli sets itself up (the
    projector's warm-up encode, one warm-up decode), then the time from submitting the prompt's chunks
    to the generation core until its first token (the image's encode, its embeddings' and the text's
    decodes, one sample); the image is read and the prompt tokenised before, as the CLI does before it
    starts timing. ``encode``: ``Projector.encode`` of that image, ``reps`` + 1 times in one process
    (the first is not kept), as the CLI's chat mode encodes it turn after turn."""
    threads = spec["threads"]
    model = pyllama.Model(spec["model"])
    proj = pyllama.Projector(model, spec["mmproj"], n_threads=threads, warmup=True)
    chunks = proj.tokenize(spec["prompt"], [proj.media_from_file(spec["image"])])
    image = next(c for c in chunks if c.type == "image")
    out: dict[str, Any] = {"n_prompt": sum(c.n_tokens for c in chunks), "n_image_tokens": image.n_tokens}
    if spec["what"] == "ttft":
        ctx = pyllama.Context(model, n_ctx=4096, n_threads=threads, n_threads_batch=threads)
        ctx.decode(pyllama.Batch.from_tokens([first_token(model)]))  # common_init's warm-up decode
        ctx.memory_clear()
        engine = pyllama.Engine(ctx, 1)
        t = now()
        engine.submit(chunks, pyllama.Sampler(model, temperature=0.0), max_tokens=1, projector=proj).run()
        out["ttft_ms"] = (now() - t) * 1e3
        engine.close()
        ctx.close()
    else:
        times = []
        for _ in range(spec["reps"] + 1):
            t = now()
            proj.encode(image)
            times.append((now() - t) * 1e3)
        out["encode_ms"] = times[1:]
    proj.close()
    return out


def speculative(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy completions with and without drafts: each arm (a name, ``speculative`` for the Llama,
    ``prediction`` text for the request) on a fresh ``Llama`` for every run, since the n-gram types keep
    what they saw between the requests of one Llama and would draft a repeated request from the last
    one. The arms alternate run by run (their order turned each time); the first pass is a warm-up that
    is not kept. Each run streams: the wall time of the call, the time to its first token, and the decode
    rate after it (the tokens after the first over the time from the first to the end), the counts of
    draft tokens accepted and rejected, and the text. With ``truth``, one more (unmeasured) run without
    drafts gives each token's text and the margin between its two best logprobs."""
    path, threads, reps, n_ctx = spec["model"], spec["threads"], spec["reps"], spec["n_ctx"]
    arms, prompts, kwargs = spec["arms"], spec["prompts"], spec["kwargs"]
    keys = ("wall_s", "ttft_s", "decode_tps", "tokens", "accepted", "rejected", "text", "prompt_tokens")
    out: dict[str, Any] = {"arms": {a["name"]: {k: [] for k in keys} for a in arms}}

    def one(arm: dict[str, Any], prompt: str) -> dict[str, Any]:
        llm = pyllama.Llama(path, n_ctx=n_ctx, n_threads=threads, speculative=arm.get("speculative"))
        extra: dict[str, Any] = {}
        if arm.get("prediction"):
            extra["prediction"] = {"type": "content", "content": arm["prediction"]}
        text: list[str] = []
        usage: dict[str, Any] = {}
        first = None
        t = now()
        for chunk in llm.complete(prompt, stream=True, temperature=0, **kwargs, **extra):
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = now()
            if chunk["choices"]:
                text.append(chunk["choices"][0]["text"])
            if chunk.get("usage"):
                usage = chunk["usage"]
        end = now()
        llm.close()
        n = usage["completion_tokens"]
        details = usage.get("completion_tokens_details") or {}
        first = end if first is None else first
        return {
            "wall_s": end - t,
            "ttft_s": first - t,
            "decode_tps": (n - 1) / (end - first) if n > 1 and end > first else float("nan"),
            "tokens": n,
            "accepted": details.get("accepted_prediction_tokens", 0),
            "rejected": details.get("rejected_prediction_tokens", 0),
            "text": "".join(text),
            "prompt_tokens": usage["prompt_tokens"],
        }

    for i in range(reps + 1):
        prompt = prompts[(spec.get("prompt_offset", 0) + i) % len(prompts)]
        k = i % len(arms)
        for arm in arms[k:] + arms[:k]:
            got = one(arm, prompt)
            if i:
                for key in keys:
                    out["arms"][arm["name"]][key].append(got[key])
    if spec.get("verify_cost"):
        out["verify_ms"] = verify_cost(spec, spec["verify_cost"])
    if spec.get("truth"):
        with pyllama.Llama(path, n_ctx=n_ctx, n_threads=threads) as llm:
            r = llm.complete(prompts[0], temperature=0, logprobs=2, **kwargs)
        lp = r["choices"][0]["logprobs"]
        margins = []
        for top in lp["top_logprobs"]:
            values = sorted(top.values(), reverse=True)
            margins.append(values[0] - values[1] if len(values) > 1 else float("inf"))
        out["truth"] = {"text": r["choices"][0]["text"], "pieces": lp["tokens"], "margins": margins}
        other = next((t for a in out["arms"].values() for t in a["text"] if t != out["truth"]["text"]), None)
        if other is not None:
            out["batch_check"] = batch_check(spec, prompts[0], out["truth"]["text"], other)
    return out


def batch_check(spec: dict[str, Any], prompt: str, truth: str, other: str) -> dict[str, Any] | None:
    """Where a run with drafts parted from the plain decode: the two tokens there, and which one a bare
    ``Context.decode`` picks (argmax of the logits) when the tokens before it are evaluated one by one up
    to a point and the rest in one batch, for batches of 1 (the plain decode) and 8 to 64 tokens. None
    when the texts do not tokenize back to themselves."""
    model = pyllama.Model(spec["model"])
    threads = spec["threads"]
    ids = model.tokenize(prompt)
    gen = model.tokenize(truth, add_special=False, parse_special=False)
    alt = model.tokenize(other, add_special=False, parse_special=False)
    k = next((i for i, (a, b) in enumerate(zip(gen, alt, strict=False)) if a != b), None)
    if k is None or model.detokenize(gen) != truth or model.detokenize(alt) != other:
        return None
    out: dict[str, Any] = {
        "position": k,
        "plain": model.detokenize([gen[k]]),
        "drafted": model.detokenize([alt[k]]),
        "splits": [],
    }
    with pyllama.Context(model, n_ctx=spec["n_ctx"], n_threads=threads, n_threads_batch=threads) as ctx:
        for n in [1, *range(8, min(k, 64) + 1, 8)]:
            ctx.memory_clear()
            ctx.decode(pyllama.Batch.from_tokens(ids, logits_last=False))
            for i, t in enumerate(gen[: k - n]):
                ctx.decode(pyllama.Batch.from_tokens([t], pos0=len(ids) + i, logits_last=False))
            ctx.decode(pyllama.Batch.from_tokens(gen[k - n : k], pos0=len(ids) + k - n))
            logits = ctx.logits()
            z = logits - logits.max()
            lp = z - np.log(np.exp(z).sum())
            pick = int(np.argmax(logits))
            picks = "plain" if pick == gen[k] else "drafted" if pick == alt[k] else "other"
            out["splits"].append({"batch": n, "picks": picks, "margin": float(lp[gen[k]] - lp[alt[k]])})
    return out


def verify_cost(spec: dict[str, Any], sizes: list[int]) -> dict[str, float]:
    """What verifying drafts costs: after the first prompt, the median time of one ``Context.decode`` of
    n tokens with logits for each (what a draft of n - 1 tokens and the token before it cost), for each
    n of ``sizes``, in ms per token."""
    model = pyllama.Model(spec["model"])
    threads = spec["threads"]
    prompt = model.tokenize(spec["prompts"][0])
    out = {}
    with pyllama.Context(model, n_ctx=spec["n_ctx"], n_threads=threads, n_threads_batch=threads) as ctx:
        for n in sizes:
            times = []
            for _ in range(7):
                ctx.memory_clear()
                ctx.decode(pyllama.Batch.from_tokens(prompt))
                batch = pyllama.Batch.from_tokens((prompt * (n // len(prompt) + 1))[:n], pos0=len(prompt))
                for i in range(n):
                    batch.set_logits(i, True)
                t = now()
                ctx.decode(batch)
                times.append(now() - t)
            out[str(n)] = 1e3 * sorted(times)[len(times) // 2] / n
    return out


TASKS = {"speed": speed, "overhead": overhead, "ttft": ttft, "media": media, "spec": speculative}

if __name__ == "__main__":
    task, spec = sys.argv[1], json.loads(sys.argv[2])
    result = TASKS[task](spec)
    result["version"] = pyllama.__version__
    print(json.dumps(result))
