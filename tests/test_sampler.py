"""Sampler: greedy decoding, seeds, distributions, logit bias and grammar constraints, against independent truths.

The truths: numpy's argmax and softmax of ctx.logits(), a fresh evaluation, Python's `re`, `json` and the `jsonschema`
package for what a grammar-constrained generation produced, and llama.cpp's documented errors. Bad input runs
crash-isolated in subprocesses (see isolated_cases.py).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import numpy as np
import pytest

import pyllama

from isolated_cases import check_case, run_cases

Batch = pyllama.Batch


@pytest.fixture(scope="module")
def model(tiny_model_path: Path) -> Iterator[pyllama.Model]:
    with pyllama.Model(str(tiny_model_path)) as m:
        yield m


def generate(
    model: pyllama.Model, sampler: pyllama.Sampler, prompt: str, max_tokens: int, *, check_greedy: bool = False
) -> tuple[list[int], bool]:
    """Sample, accept and decode up to max_tokens tokens after `prompt` in a fresh Context; stop at an
    end-of-generation token (accepted, not returned). Returns the tokens and whether generation ended by itself.
    With check_greedy, every sampled token is checked against numpy's argmax of the logits it was sampled from."""
    tokens = model.tokenize(prompt)
    with pyllama.Context(model, n_ctx=512, n_threads=1) as ctx:
        ctx.decode(Batch.from_tokens(tokens))
        pos, out = len(tokens), list[int]()
        for _ in range(max_tokens):
            tok = sampler.sample(ctx)
            if check_greedy:
                assert tok == int(np.argmax(ctx.logits())), (len(out), tok)
            sampler.accept(tok)
            if model.token_is_eog(tok):
                return out, True
            out.append(tok)
            ctx.decode(Batch.from_tokens([tok], pos0=pos))
            pos += 1
    return out, False


# --- 1. greedy -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"temperature": 0}, {"greedy": True}, {"temperature": -1.0}], ids=str)
def test_greedy_is_numpy_argmax(model: pyllama.Model, kwargs: dict[str, Any]) -> None:
    """temperature=0 (or greedy=True, or a negative temperature) picks numpy's argmax of ctx.logits() at every one
    of 12 generated tokens, each decoded before the next is sampled; and the whole run is reproducible."""
    first, _ = generate(model, pyllama.Sampler(model, **kwargs), "Once upon a time", 12, check_greedy=True)
    again, _ = generate(model, pyllama.Sampler(model, **kwargs), "Once upon a time", 12)
    assert len(first) == 12
    assert first == again


def test_greedy_sample_at_each_output_index(model: pyllama.Model) -> None:
    """sample(ctx, idx) reads the output at batch index idx (or counted back from the last output when negative):
    with several outputs in one batch, each greedy sample is numpy's argmax of ctx.logits(idx)."""
    tokens = model.tokenize("The quick brown fox jumps over the lazy dog")
    batch = Batch.from_tokens(tokens, logits_last=False)
    for i in (2, 5, len(tokens) - 1):
        batch.set_logits(i)
    sampler = pyllama.Sampler(model, temperature=0)
    with pyllama.Context(model, n_ctx=256, n_threads=1) as ctx:
        ctx.decode(batch)
        for i in (2, 5, len(tokens) - 1, -1, -2, -3):
            assert sampler.sample(ctx, i) == int(np.argmax(ctx.logits(i))), i


@pytest.mark.real_model
def test_gemma_greedy_is_argmax_and_knows_berlin(gemma_path: Path) -> None:
    """On the real Gemma 3 270M, greedy sampling is numpy's argmax at each of 10 generated tokens, and the
    continuation of "The capital of France is Paris. The capital of Germany is" names Berlin."""
    with pyllama.Model(str(gemma_path)) as gemma:
        sampler = pyllama.Sampler(gemma, temperature=0)
        out, _ = generate(
            gemma, sampler, "The capital of France is Paris. The capital of Germany is", 10, check_greedy=True
        )
        text = gemma.detokenize(out)
    assert len(out) >= 1
    assert "Berlin" in text, text


# --- 2. seeds and distributions ------------------------------------------------------------------------------------


def test_same_seed_same_tokens_different_seeds_differ(model: pyllama.Model) -> None:
    """At temperature 1.0, the same seed gives the same 8 tokens twice; five different seeds do not all give the
    same sequence; the seed property reports the seed; and every sampled token is among the top_k=40 highest
    logits (numpy's ranking) at its step, as the chain's top-k stage requires."""

    def run(seed: int) -> list[int]:
        sampler = pyllama.Sampler(model, seed=seed, temperature=1.0, top_k=40)
        assert sampler.seed == seed
        tokens = model.tokenize("In a hole in the ground")
        out = []
        with pyllama.Context(model, n_ctx=256, n_threads=1) as ctx:
            ctx.decode(Batch.from_tokens(tokens))
            for pos in range(len(tokens), len(tokens) + 8):
                logits = ctx.logits()
                tok = sampler.sample(ctx)
                assert int((logits > logits[tok]).sum()) < 40, "sampled outside the top 40"
                sampler.accept(tok)
                out.append(tok)
                ctx.decode(Batch.from_tokens([tok], pos0=pos))
        return out

    assert run(1234) == run(1234)
    sequences = {tuple(run(seed)) for seed in range(5)}
    assert len(sequences) > 1, sequences


def test_clone_continues_identically(model: pyllama.Model) -> None:
    """A clone carries the RNG state: after a few tokens, the original and its clone draw the same next tokens from
    the same logits."""
    sampler = pyllama.Sampler(model, seed=7, temperature=1.0)
    with pyllama.Context(model, n_ctx=256, n_threads=1) as ctx:
        ctx.decode(Batch.from_tokens(model.tokenize("Hello there")))
        for _ in range(3):
            sampler.accept(sampler.sample(ctx))
        twin = sampler.clone()
        assert [sampler.sample(ctx) for _ in range(5)] == [twin.sample(ctx) for _ in range(5)]


def test_temperature_one_draws_from_the_softmax(model: pyllama.Model) -> None:
    """With every truncation off (top_k=0, top_p=1, min_p=0) at temperature 1, 1500 draws from the same logits
    follow softmax(logits + bias) computed by numpy. logit_bias makes four tokens carry almost all the mass (and
    is itself checked: the probabilities use the biased logits)."""
    favourites = {1000: 14.0, 2000: 14.5, 3000: 15.0, 4000: 15.5}
    sampler = pyllama.Sampler(
        model, seed=99, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, logit_bias=favourites, penalty_last_n=0
    )
    with pyllama.Context(model, n_ctx=256, n_threads=1) as ctx:
        ctx.decode(Batch.from_tokens(model.tokenize("Pick one")))
        logits = ctx.logits().astype(np.float64)
        n = 1500
        counts = Counter(sampler.sample(ctx) for _ in range(n))
    for tok, bias in favourites.items():
        logits[tok] += bias
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert p[list(favourites)].sum() > 0.9
    for tok in favourites:
        sigma = np.sqrt(p[tok] * (1 - p[tok]) / n)
        assert abs(counts[tok] / n - p[tok]) < 5 * sigma + 1e-3, (tok, counts[tok] / n, p[tok])
    others = n - sum(counts[t] for t in favourites)
    assert others / n < 1 - p[list(favourites)].sum() + 0.03


def test_logit_bias_steers_greedy(model: pyllama.Model) -> None:
    """A +100 bias on one token makes it the greedy pick; a -100 bias on the unbiased argmax removes it (the pick is
    then numpy's argmax of the logits without that token)."""
    with pyllama.Context(model, n_ctx=256, n_threads=1) as ctx:
        ctx.decode(Batch.from_tokens(model.tokenize("Bias me")))
        logits = ctx.logits()
        best = int(np.argmax(logits))
        target = int(np.argmin(logits))
        assert pyllama.Sampler(model, temperature=0, logit_bias={target: 100.0}).sample(ctx) == target
        masked = logits.copy()
        masked[best] = -np.inf
        assert pyllama.Sampler(model, temperature=0, logit_bias={best: -100.0}).sample(ctx) == int(np.argmax(masked))


@pytest.mark.parametrize(
    "kwargs",
    [{"presence_penalty": 100.0}, {"frequency_penalty": 100.0}, {"repeat_penalty": 1e6}],
    ids=str,
)
def test_greedy_with_a_penalty_avoids_the_repeated_argmax(model: pyllama.Model, kwargs: dict[str, Any]) -> None:
    """Greedy with a penalty is not the bare argmax of the logits: once the argmax has been accepted, a strong
    presence, frequency or repetition penalty makes the pick the best token among the others (numpy's argmax with
    that token masked), while plain greedy still picks it."""
    with pyllama.Context(model, n_ctx=256, n_threads=1) as ctx:
        ctx.decode(Batch.from_tokens(model.tokenize("Penalise me")))
        logits = ctx.logits()
        best = int(np.argmax(logits))
        masked = logits.copy()
        masked[best] = -np.inf
        plain = pyllama.Sampler(model, temperature=0)
        penalised = pyllama.Sampler(model, temperature=0, **kwargs)
        for s in (plain, penalised):
            s.accept(best)
        assert plain.sample(ctx) == best
        if logits[best] > 0 or "repeat_penalty" not in kwargs:
            assert penalised.sample(ctx) == int(np.argmax(masked))


# --- 5. grammars ---------------------------------------------------------------------------------------------------


def test_gbnf_grammar_output_matches(model: pyllama.Model) -> None:
    """A random model constrained by `root ::= ("yes" | "no") "."` produces, for each of 6 seeds, text that the
    equivalent regular expression accepts in full, and ends by itself (an end-of-generation token once the grammar
    is complete); over the seeds both alternatives occur."""
    outputs = set()
    for seed in range(6):
        sampler = pyllama.Sampler(model, seed=seed, temperature=1.0, grammar='root ::= ("yes" | "no") "."')
        out, ended = generate(model, sampler, "Answer:", 16)
        text = model.detokenize(out)
        assert ended, text
        assert re.fullmatch(r"(yes|no)\.", text), text
        outputs.add(text)
    assert outputs == {"yes.", "no."}  # both branches of the grammar are reachable


def closing_bias(model: pyllama.Model) -> dict[int, float]:
    """+8 on the tokens `"`, `}`, `"}` and end-of-text: steers a random model to close strings and objects soon.
    Unbiased, the random tiny model rambles inside the first JSON string well past 100 tokens (observed for 5 of
    5 seeds); the bias changes what is likely, never what the grammar allows."""
    pieces = {b'"', b"}", b'"}'}
    bias = {t: 8.0 for t in range(model.n_vocab) if model.token_to_piece(t) in pieces}
    assert model.token_eos is not None
    bias[model.token_eos] = 8.0
    return bias


def test_json_grammar_output_parses(model: pyllama.Model) -> None:
    """grammar="json" (llama.cpp's JSON grammar, also pyllama.JSON_GRAMMAR) yields, for each of 6 seeds, text that
    json.loads parses into an object, ending by itself within 64 tokens."""
    bias = closing_bias(model)
    for seed in range(6):
        sampler = pyllama.Sampler(model, seed=seed, temperature=1.0, grammar="json", logit_bias=bias)
        out, ended = generate(model, sampler, "JSON:", 64)
        text = model.detokenize(out)
        assert ended, f"no end within 64 tokens: {text!r}"
        assert isinstance(json.loads(text), dict), text


def test_json_grammar_text_is_the_same_grammar(model: pyllama.Model) -> None:
    """grammar=pyllama.JSON_GRAMMAR behaves exactly like grammar="json": same seed, same tokens."""
    bias = closing_bias(model)
    a, _ = generate(model, pyllama.Sampler(model, seed=3, grammar="json", logit_bias=bias), "JSON:", 64)
    b, _ = generate(model, pyllama.Sampler(model, seed=3, grammar=pyllama.JSON_GRAMMAR, logit_bias=bias), "JSON:", 64)
    assert a == b


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"enum": ["x", "y"]},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("as_text", [False, True], ids=["dict", "json-text"])
def test_json_schema_output_validates(model: pyllama.Model, as_text: bool) -> None:
    """json_schema (as a dict or as JSON text) constrains a random model to output that the `jsonschema` package
    validates against the same schema, for each of 6 seeds, ending by itself."""
    schema: dict[str, Any] | str = json.dumps(SCHEMA) if as_text else SCHEMA
    for seed in range(6):
        sampler = pyllama.Sampler(model, seed=seed, temperature=1.0, json_schema=schema)
        out, ended = generate(model, sampler, "JSON:", 64)
        text = model.detokenize(out)
        assert ended, f"no end within 64 tokens: {text!r}"
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_schema_to_grammar_is_what_the_sampler_uses(model: pyllama.Model) -> None:
    """pyllama.json_schema_to_grammar(schema) as grammar= gives the same tokens as json_schema=schema (same seed),
    and the text has a root rule."""
    gbnf = pyllama.json_schema_to_grammar(SCHEMA)
    assert re.search(r"^root ::= ", gbnf, re.M)
    a, _ = generate(model, pyllama.Sampler(model, seed=5, json_schema=SCHEMA), "JSON:", 64)
    b, _ = generate(model, pyllama.Sampler(model, seed=5, grammar=gbnf), "JSON:", 64)
    assert a == b


def test_grammar_reset_starts_over(model: pyllama.Model) -> None:
    """After a complete "yes."/"no." answer, reset() lets the same sampler produce another complete answer (the
    grammar is back at its start rather than finished).

    At the pinned llama.cpp common_sampler_reset() leaves the grammar where it was; pyllama's reset() rebuilds the
    chain, so the grammar starts over (and agrees with the shadow grammar that guards end-of-generation tokens)."""
    sampler = pyllama.Sampler(model, seed=1, temperature=1.0, grammar='root ::= ("yes" | "no") "."')
    first, ended = generate(model, sampler, "Answer:", 16)
    assert ended and re.fullmatch(r"(yes|no)\.", model.detokenize(first))
    sampler.reset()
    second, ended = generate(model, sampler, "Answer:", 16)
    assert ended and re.fullmatch(r"(yes|no)\.", model.detokenize(second))


# --- 8. bad input, each crash-isolated ---------------------------------------------------------------------------

# Each case runs with `m` (the tiny model), `m2` (a second load of it), `B`, `np`, `ctx` after decoding "a b c"
# (3 tokens, only the last an output) and `a_tok` (the id of the piece "a" with no leading space).
CASES: dict[str, tuple[str, str, str]] = {
    "sample a non-output": ("pyllama.Sampler(m).sample(ctx, 0)", "IndexError", "not an output"),
    "sample past the batch": ("pyllama.Sampler(m).sample(ctx, 3)", "IndexError", "past the last"),
    "sample -2 with one output": ("pyllama.Sampler(m).sample(ctx, -2)", "IndexError", "outputs"),
    "sample before any decode": (
        "pyllama.Sampler(m).sample(pyllama.Context(m, n_ctx=64))",
        "IndexError",
        "no outputs",
    ),
    "sample another model's context": (
        "pyllama.Sampler(m2).sample(ctx)",
        "ValueError",
        "another model",
    ),
    "accept EOG with unfinished grammar": (
        's = pyllama.Sampler(m, grammar=\'root ::= "a" "b"\'); s.accept(a_tok); s.accept(m.token_eos)',
        "ValueError",
        "grammar is not complete",
    ),
    "accept EOG before any grammar token": (
        "s = pyllama.Sampler(m, grammar='root ::= \"a\"'); s.accept(m.token_eos)",
        "ValueError",
        "grammar is not complete",
    ),
    "accept a token the grammar refuses": (
        "s = pyllama.Sampler(m, grammar='root ::= \"a\"'); s.accept(m.tokenize('zzz', add_special=False)[0])",
        "ValueError",
        "grammar",
    ),
    "accept token out of range": ("pyllama.Sampler(m).accept(32000)", "ValueError", "out of range"),
    "accept token negative": ("pyllama.Sampler(m).accept(-1)", "ValueError", "out of range"),
    "gbnf missing paren": ("pyllama.Sampler(m, grammar='root ::= (\"a\"')", "ValueError", "expecting ')'"),
    "gbnf undefined rule": ("pyllama.Sampler(m, grammar='root ::= foo')", "ValueError", "foo"),
    "gbnf no root": ("pyllama.Sampler(m, grammar='start ::= \"a\"')", "ValueError", "root"),
    "schema unknown type": (
        "pyllama.Sampler(m, json_schema={'type': 'nonsense'})",
        "ValueError",
        "invalid JSON schema",
    ),
    "schema not json": ("pyllama.Sampler(m, json_schema='{not json')", "ValueError", "invalid JSON schema"),
    "schema bad ref": ("pyllama.Sampler(m, json_schema={'$ref': '#/nowhere'})", "ValueError", "invalid JSON schema"),
    "json_schema_to_grammar bad": (
        "pyllama.json_schema_to_grammar({'type': 'nonsense'})",
        "ValueError",
        "invalid JSON schema",
    ),
    "grammar and schema": (
        "pyllama.Sampler(m, grammar='root ::= \"a\"', json_schema={'type': 'integer'})",
        "ValueError",
        "not both",
    ),
    "lazy without triggers": (
        "pyllama.Sampler(m, grammar='root ::= \"a\"', grammar_lazy=True)",
        "ValueError",
        "trigger",
    ),
    "triggers without grammar": ("pyllama.Sampler(m, trigger_words=['x'])", "ValueError", "need a grammar"),
    "bad trigger pattern": (
        "pyllama.Sampler(m, grammar='root ::= \"a\"', grammar_lazy=True, trigger_patterns=['('])",
        "ValueError",
        "trigger pattern",
    ),
    "trigger token out of range": (
        "pyllama.Sampler(m, grammar='root ::= \"a\"', grammar_lazy=True, trigger_tokens=[32000])",
        "ValueError",
        "out of range",
    ),
    "unknown sampler name": ("pyllama.Sampler(m, samplers=['top_k', 'bogus'])", "ValueError", "bogus"),
    "mirostat 3": ("pyllama.Sampler(m, mirostat=3)", "ValueError", "mirostat"),
    "mirostat -1": ("pyllama.Sampler(m, mirostat=-1)", "ValueError", "mirostat"),
    "logit_bias inf": ("pyllama.Sampler(m, logit_bias={5: float('inf')})", "ValueError", "finite"),
    "logit_bias -inf": ("pyllama.Sampler(m, logit_bias={5: float('-inf')})", "ValueError", "finite"),
    "logit_bias nan": ("pyllama.Sampler(m, logit_bias={5: float('nan')})", "ValueError", "finite"),
    "logit_bias token too big": ("pyllama.Sampler(m, logit_bias={32000: 1.0})", "ValueError", "out of range"),
    "logit_bias token negative": ("pyllama.Sampler(m, logit_bias={-1: 1.0})", "ValueError", "out of range"),
    "temperature nan": ("pyllama.Sampler(m, temperature=float('nan'))", "ValueError", "finite"),
    "seed negative": ("pyllama.Sampler(m, seed=-1)", "ValueError", "seed"),
    "seed too big": ("pyllama.Sampler(m, seed=2**32)", "ValueError", "seed"),
    "penalty_last_n -2": ("pyllama.Sampler(m, penalty_last_n=-2)", "ValueError", "penalty_last_n"),
    "unknown kwarg": ("pyllama.Sampler(m, temprature=0.5)", "TypeError", "temprature"),
    "wrong kwarg type": ("pyllama.Sampler(m, top_k='many')", "TypeError", "top_k"),
    "preserved token out of range": ("pyllama.Sampler(m, preserved_tokens=[10**6])", "ValueError", "out of range"),
}

SETUP = """
import numpy as np
import pyllama

B = pyllama.Batch
m = pyllama.Model(MODEL)
m2 = pyllama.Model(MODEL)
a_tok = m.token_id("a")
ctx = pyllama.Context(m, n_ctx=256, n_threads=1)
ctx.decode(B.from_tokens(m.tokenize("a b c", add_special=False)))
assert len(m.tokenize("a b c", add_special=False)) == 3
"""


@pytest.fixture(scope="module")
def bad_input_results(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    setup = f"MODEL = {str(tiny_model_path)!r}\n" + SETUP
    return run_cases(setup, {name: code for name, (code, _, _) in CASES.items()}, tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises(case: str, bad_input_results: dict[str, dict[str, Any]]) -> None:
    """Each bad call raises the documented exception type with llama.cpp's or pyllama's reason in the message, and
    never crashes (llama.cpp itself would abort() for an end-of-generation token accepted by an unfinished
    grammar)."""
    _, exc_type, fragment = CASES[case]
    check_case(bad_input_results[case], exc_type, fragment)
