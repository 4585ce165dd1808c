"""LoRA adapters (and aLoRA) and control vectors: greedy tokens against llama.cpp's own
llama-completion (--lora, --lora-scaled, --control-vector-scaled) on the same files, and against the
low-level loop (Context.set_lora, numpy's argmax) where llama-completion has no counterpart (adapters
per request, batched apart; an aLoRA switched on at its invocation). Tiny random-weight models and
adapters written with gguf-py; every truth is computed in the same run."""

from __future__ import annotations

import concurrent.futures
import math
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pyllama

from tiny_models import ROOT, write_tiny_control_vector, write_tiny_llama, write_tiny_lora

PROMPT = "Once upon a time, in a land far away,"
N = 10


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lora")
    out = {
        "model": write_tiny_llama(d / "model.gguf"),
        "a": write_tiny_lora(d / "lora-a.gguf", seed=1, strength=2.0),
        "b": write_tiny_lora(d / "lora-b.gguf", seed=2, strength=2.0, targets=("attn_k", "attn_output", "ffn_down")),
        "other": write_tiny_lora(d / "lora-other.gguf", n_embd=32, n_ff=64),
        "cv": write_tiny_control_vector(d / "cv.gguf", strength=4.0),
        "cv-narrow": write_tiny_control_vector(d / "cv-narrow.gguf", n_embd=32),
    }
    blob = out["a"].read_bytes()
    (d / "lora-cut.gguf").write_bytes(blob[: len(blob) * 2 // 3])
    out["cut"] = d / "lora-cut.gguf"
    (d / "not-gguf.gguf").write_bytes(b"this is not a GGUF file at all" * 10)
    out["junk"] = d / "not-gguf.gguf"
    return out


@pytest.fixture(scope="module")
def completion_cli() -> Path:
    tools = sorted(ROOT.glob("build/*/test-tools/llama-completion"))
    if not tools:  # pragma: no cover
        pytest.skip("llama-completion is not in the build tree (built unless -DPYLLAMA_TEST_TOOLS=OFF)")
    return tools[-1]


def cli_text(cli: Path, model: Path, *flags: str) -> str:
    """llama-completion's greedy continuation of PROMPT (N tokens, end of text ignored)."""
    run = subprocess.run(
        [
            str(cli),
            *("-m", str(model), "-p", PROMPT, "-n", str(N), "--temp", "0", "-t", "2", "-c", "256"),
            *("--ignore-eos", "-no-cnv", "--no-display-prompt", "--no-warmup", *flags),
        ],
        capture_output=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    return run.stdout.decode("utf-8", errors="replace").strip("\n")


def complete(llm: pyllama.Llama, prompt: str | list[int] = PROMPT, n: int = N, **kwargs: Any) -> dict[str, Any]:
    out = llm.complete(prompt, max_tokens=n, temperature=0.0, ignore_eos=True, **kwargs)
    assert isinstance(out, dict)
    return out


def text(out: dict[str, Any]) -> str:
    return str(out["choices"][0]["text"])


def pieces(model: pyllama.Model, tokens: list[int]) -> str:
    """The text of tokens generated after a prompt (each token's piece, as a reply's text joins them)."""
    return b"".join(model.token_to_piece(t) for t in tokens).decode("utf-8", "replace")


def loop_greedy(model: pyllama.Model, prompt: list[int], n: int, steps: list[tuple[int, list[Any]]]) -> list[int]:
    """n greedy tokens by numpy's argmax over a low-level Context: the prompt is decoded in the
    pieces ``steps`` gives ((end, adapters): prompt[previous end:end] with those adapters); the reply
    runs with the last piece's adapters."""
    with pyllama.Context(model, n_ctx=512, n_threads=2) as ctx:
        start = 0
        for end, lora in steps:
            ctx.set_lora(lora)
            ctx.decode(pyllama.Batch.from_tokens(prompt[start:end], pos0=start, logits_last=True))
            start = end
        assert start == len(prompt)
        out: list[int] = []
        for _ in range(n):
            tok = int(np.argmax(ctx.logits()))
            out.append(tok)
            ctx.decode(pyllama.Batch.from_tokens([tok], pos0=start))
            start += 1
        return out


# --- against llama-completion ------------------------------------------------------------------


def test_lora_at_scales_equals_llama_completion(files: dict[str, Path], completion_cli: Path) -> None:
    """Greedy text with adapter A at scale 1.0 (--lora) and 0.5 (--lora-scaled) is llama-completion's;
    scale 0 is the base model's, and the adapter changes the text (else the test could not fail)."""
    base = cli_text(completion_cli, files["model"])
    full = cli_text(completion_cli, files["model"], "--lora", str(files["a"]))
    half = cli_text(completion_cli, files["model"], "--lora-scaled", f"{files['a']}:0.5")
    assert full != base and half != full
    with pyllama.Llama(files["model"], n_ctx=256, n_threads=2, lora=[files["a"]]) as llm:
        assert text(complete(llm)) == full
        assert llm.lora == [(str(files["a"]), 1.0)]
        llm.set_lora([(files["a"], 0.5)])  # rescaled without reloading
        assert text(complete(llm)) == half
        assert len(llm.lora_adapters) == 1
        llm.set_lora([(files["a"], 0.0)])
        assert text(complete(llm)) == base
        llm.set_lora(None)
        assert text(complete(llm)) == base
    with pyllama.Llama(files["model"], n_ctx=256, n_threads=2) as plain:
        assert text(complete(plain)) == base


def test_two_adapters_at_once_equal_llama_completion(files: dict[str, Path], completion_cli: Path) -> None:
    both = cli_text(completion_cli, files["model"], "--lora-scaled", f"{files['a']}:0.7,{files['b']}:1.2")
    with pyllama.Llama(files["model"], n_ctx=256, n_threads=2) as llm:
        assert text(complete(llm, lora=[(files["a"], 0.7), (files["b"], 1.2)])) == both


def test_control_vector_equals_llama_completion(files: dict[str, Path], completion_cli: Path) -> None:
    """A control vector at a strength, then removed: llama-completion's --control-vector-scaled, then
    the base model's text again; the fingerprint of saved states follows the vector."""
    base = cli_text(completion_cli, files["model"])
    steered = cli_text(completion_cli, files["model"], "--control-vector-scaled", f"{files['cv']}:0.8")
    ranged = cli_text(
        completion_cli, files["model"], "--control-vector", str(files["cv"]), "--control-vector-layer-range", "1", "1"
    )
    assert steered != base and ranged != base
    with pyllama.Llama(files["model"], n_ctx=256, n_threads=2, control_vectors=[(files["cv"], 0.8)]) as llm:
        assert text(complete(llm)) == steered
        steered_fp = llm.fingerprint
        llm.set_control_vectors(None)
        assert text(complete(llm)) == base and llm.fingerprint != steered_fp
        llm.set_control_vectors([files["cv"]], layer_range=(1, 1))
        out = complete(llm)
        assert text(out) == ranged
        # the sequence held cells computed without the vector: they were dropped, not reused
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


# --- adapters per request, in the one generation core ------------------------------------------


def test_requests_with_different_adapters_batch_apart(files: dict[str, Path]) -> None:
    """Four requests at once on two sequences: none, A, B and A at 0.5. Each reply is the low-level
    loop's with its own adapters (requests with other sets decode in steps of their own)."""
    with pyllama.Model(str(files["model"])) as model:
        a = pyllama.LoraAdapter(model, str(files["a"]))
        b = pyllama.LoraAdapter(model, str(files["b"]))
        sets: list[list[Any]] = [[], [(a, 1.0)], [(b, 1.0)], [(a, 0.5)]]
        prompts = [list(model.tokenize(p)) for p in (PROMPT, PROMPT, "A different prompt", PROMPT + " more")]
        truth = [loop_greedy(model, p, N, [(len(p), s)]) for p, s in zip(prompts, sets, strict=True)]
        assert len({tuple(t) for t in truth}) == 4
    with (
        pyllama.Llama(files["model"], n_ctx=1024, n_threads=2, n_parallel=2) as llm,
        concurrent.futures.ThreadPoolExecutor(4) as pool,
    ):
        a_, b_ = llm._adapters.load(files["a"]), llm._adapters.load(files["b"])
        mine = [[], [(a_, 1.0)], [(b_, 1.0)], [(a_, 0.5)]]
        outs = list(pool.map(lambda i: complete(llm, prompts[i], lora=mine[i]), range(4)))
        want = [pieces(llm.model, t) for t in truth]
    assert [text(o) for o in outs] == want


def test_a_prefix_is_reused_only_under_the_same_adapters(files: dict[str, Path]) -> None:
    """The same prompt without adapters, then with A, then with A again: the second evaluates afresh
    (cells computed without A are no use to it), the third reuses the second's; every reply equals a
    fresh Llama's with the same adapters."""
    with pyllama.Llama(files["model"], n_ctx=256, n_threads=2) as llm:
        n_prompt = len(llm.tokenize(PROMPT))
        plain = complete(llm)
        with_a = complete(llm, lora=[files["a"]])
        again = complete(llm, lora=[(files["a"], 1.0)])
    assert with_a["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 1
    with pyllama.Llama(files["model"], n_ctx=256, n_threads=2, lora=[files["a"]]) as fresh:
        assert text(complete(fresh)) == text(with_a) == text(again)
    with pyllama.Llama(files["model"], n_ctx=256, n_threads=2) as fresh:
        assert text(complete(fresh)) == text(plain) != text(with_a)


def test_alora_switches_on_at_its_invocation(files: dict[str, Path], tmp_path: Path) -> None:
    """An aLoRA applies from the last occurrence of its invocation tokens in the prompt: the tokens
    before it are computed without it (the low-level loop in two pieces is the truth), a prompt
    without the invocation runs without it, and a prefix computed without adapters is reused."""
    with pyllama.Model(str(files["model"]), vocab_only=True) as vocab:
        invocation = list(vocab.tokenize(" Now the answer:", add_special=False))
    alora_path = write_tiny_lora(tmp_path / "alora.gguf", seed=3, strength=2.0, invocation_tokens=invocation)
    with pyllama.Model(str(files["model"])) as model:
        alora = pyllama.LoraAdapter(model, str(alora_path))
        assert alora.is_alora and alora.invocation_tokens == invocation
        head = list(model.tokenize(PROMPT + " Now the answer: no. Then"))
        prompt = head + invocation + list(model.tokenize(" yes", add_special=False))
        start = len(head)
        truth = loop_greedy(model, prompt, N, [(start, []), (len(prompt), [(alora, 1.0)])])
        whole = loop_greedy(model, prompt, N, [(len(prompt), [(alora, 1.0)])])
        plain = loop_greedy(model, prompt, N, [(len(prompt), [])])
        assert truth != whole and truth != plain  # the split matters
        no_call = list(model.tokenize(PROMPT))
        plain_no_call = loop_greedy(model, no_call, N, [(len(no_call), [])])
    with pyllama.Llama(files["model"], n_ctx=256, n_threads=2) as llm:
        first = complete(llm, [*head, invocation[0]])  # no adapter: computes the head's cells
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        out = complete(llm, prompt, lora=[alora_path], logprobs=0)
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == start  # the head, and no more
        assert text(out) == pieces(llm.model, truth)
        off = complete(llm, no_call, lora=[alora_path])
        assert text(off) == pieces(llm.model, plain_no_call)
        assert llm.lora_adapters[0]["alora_invocation_tokens"] == invocation
        with pytest.raises(pyllama.InvalidRequestError):
            complete(llm, prompt, lora=[alora_path, write_tiny_lora(tmp_path / "alora2.gguf", invocation_tokens=[5])])


def test_a_saved_state_keeps_its_adapters(files: dict[str, Path], tmp_path: Path) -> None:
    """save_state of a sequence computed with A, loaded into a new Llama: the state names A, a prompt
    with A reuses it (and one without does not), and the reply is a fresh one's."""
    with pyllama.Llama(files["model"], n_ctx=256, n_threads=2) as llm:
        complete(llm, lora=[(files["a"], 0.5)])
        state = llm.save_state(tmp_path / "a.state")
        assert state.lora == ((str(files["a"]), 0.5),)
    with pyllama.Llama(files["model"], n_ctx=256, n_threads=2) as other:
        other.load_state(tmp_path / "a.state")
        out = complete(other, PROMPT + " again", lora=[(files["a"], 0.5)])
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == len(other.tokenize(PROMPT))
        other.load_state(tmp_path / "a.state")
        plain = complete(other, PROMPT + " again")
        assert plain["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    with pyllama.Llama(files["model"], n_ctx=256, n_threads=2, lora=[(files["a"], 0.5)]) as fresh:
        assert text(complete(fresh, PROMPT + " again")) == text(out)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_adapters_and_vectors_raise_typed_errors(files: dict[str, Path], tmp_path: Path) -> None:
    with pyllama.Model(str(files["model"])) as model:
        for bad in ("other", "cut", "junk"):
            with pytest.raises(pyllama.ModelLoadError):
                pyllama.LoraAdapter(model, str(files[bad]))
        with pytest.raises(FileNotFoundError):
            pyllama.LoraAdapter(model, str(tmp_path / "missing.gguf"))
        with pytest.raises(pyllama.InvalidRequestError):
            pyllama.load_control_vectors(model, [(str(files["cv-narrow"]), 1.0)])
        with pytest.raises(FileNotFoundError):
            pyllama.load_control_vectors(model, [(str(tmp_path / "missing.gguf"), 1.0)])
        with pytest.raises(pyllama.InvalidRequestError):
            pyllama.load_control_vectors(model, [(str(files["a"]), 1.0)])  # a LoRA file, not a vector
        with pyllama.Model(str(files["model"])) as twin:  # the same file loaded again: another model
            foreign = pyllama.LoraAdapter(twin, str(files["a"]))
            with pyllama.Context(model, n_ctx=64) as ctx, pytest.raises(pyllama.InvalidRequestError):
                ctx.set_lora([(foreign, 1.0)])
    with pyllama.Llama(files["model"], n_ctx=256, n_threads=2) as llm:
        for lora, param in (
            ([{"id": 3, "scale": 1.0}], "lora[0].id"),
            ([(files["a"], math.nan)], "lora"),
            ([(files["a"], "x")], "lora[0]"),
            ("one.gguf", "lora"),
        ):
            with pytest.raises(pyllama.InvalidRequestError) as info:
                complete(llm, lora=lora)
            assert info.value.param == param
        with pytest.raises(pyllama.ModelLoadError):
            complete(llm, lora=[files["other"]])
        with pytest.raises(pyllama.InvalidRequestError):
            llm.set_control_vectors([files["cv"]], layer_range=(2, 1))
        # nothing was lost: the Llama serves the next request, without adapters
        assert llm.lora == [] and complete(llm)["usage"]["completion_tokens"] == N


# --- the server -----------------------------------------------------------------------------------


def test_the_server_lists_sets_and_takes_adapters_per_request(files: dict[str, Path]) -> None:
    """pyllama serve --lora A --lora-scaled B:0.5: GET /lora-adapters lists both at their scales; a
    request's "lora" changes the scales it names for itself (llama-server's rule); POST /lora-adapters
    changes the global scales. Every reply is a local Llama's with the same adapters."""
    import httpx

    from live_server import LiveServer

    def local(lora: list[tuple[Path, float]]) -> str:
        with pyllama.Llama(files["model"], n_ctx=256, n_threads=1, lora=lora) as llm:
            return text(complete(llm))

    body = {"prompt": PROMPT, "max_tokens": N, "temperature": 0, "ignore_eos": True}
    server = LiveServer(files["model"], 2, "--lora", str(files["a"]), "--lora-scaled", f"{files['b']}:0.5")
    try:
        url = server.url
        listed = httpx.get(url + "/lora-adapters").json()
        assert [(a["id"], a["path"], a["scale"]) for a in listed] == [
            (0, str(files["a"]), 1.0),
            (1, str(files["b"]), 0.5),
        ]
        got = httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"]
        assert got == local([(files["a"], 1.0), (files["b"], 0.5)])
        only_b = {**body, "lora": [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]}
        got = httpx.post(url + "/v1/completions", json=only_b).json()["choices"][0]["text"]
        assert got == local([(files["b"], 1.0)])
        assert httpx.post(url + "/lora-adapters", json=[{"id": 0, "scale": 0.25}]).json() == {"success": True}
        assert [a["scale"] for a in httpx.get(url + "/lora-adapters").json()] == [0.25, 0.5]
        got = httpx.post(url + "/v1/completions", json=body).json()["choices"][0]["text"]
        assert got == local([(files["a"], 0.25), (files["b"], 0.5)])
        for bad, param in (
            ({**body, "lora": [{"id": 7, "scale": 1.0}]}, "lora[0].id"),
            ({**body, "lora": [{"scale": 1.0}]}, "lora[0].id"),
            ({**body, "lora": {"id": 0}}, "lora"),
        ):
            r = httpx.post(url + "/v1/completions", json=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == param
        r = httpx.post(url + "/lora-adapters", json={"id": 0, "scale": 1.0})
        assert r.status_code == 400
    finally:
        server.stop()
