"""Writes docs/benchmarks.md and its plots from benchmarks/.work/results.json.

Medians over the measured repetitions (the warm-up runs are never recorded); ratios are to
llama.cpp's own tool measured in the same run. A block between the notes markers in the existing
docs/benchmarks.md is kept as it is (hand-written remarks on the figures).
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Collection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
NOTES_BEGIN, NOTES_END = "<!-- notes -->", "<!-- /notes -->"

med = statistics.median


def p(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def ratio(x: float | None, ref: float | None) -> str:
    return "-" if x is None or not ref else f"{x / ref:.3f}"


def show(argv: list[str]) -> str:
    """A command as one would type it: programs and files by their names, the port as 8080."""
    import shlex

    out = []
    for i, a in enumerate(argv):
        if i == 0 or (("/" in a or "\\" in a) and Path(a).exists()):
            a = Path(a).name
            a = "python" if a.startswith("python") else a
        elif i > 0 and argv[i - 1] == "--port":
            a = "8080"
        out.append(a)
    return "`" + shlex.join(out) + "`"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


class Doc:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self("| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|")
        for r in rows:
            self("| " + " | ".join(r) + " |")
        self("")


def speed_rows(s: dict[str, Any]) -> tuple[list[list[str]], dict[str, float]]:
    pp_ref = med(s["llama-bench"]["pp"]["samples"])
    tg_ref = med(s["llama-bench"]["tg"]["samples"])
    rows = [["llama.cpp `llama-bench`", "`llama_decode` loop, no sampling", fmt(pp_ref), "1.000", fmt(tg_ref), "1.000"]]
    paths = [
        (
            "pyllama",
            "`Context.decode` (pp) / `Engine`, C++ loop, greedy (tg)",
            "pp_context_decode",
            "tg_generator_greedy",
        ),
        ("pyllama", "Python loop: `Context.decode` + `Sampler.sample` per token", None, "tg_python_loop_greedy"),
        ("pyllama", "`Llama.complete` (greedy)", "pp_llama_complete", "tg_llama_complete"),
        ("pyllama", "`Llama.chat` (greedy)", None, "tg_llama_chat"),
        ("llama-cpp-python", "`Llama.eval` (pp) / `Llama.generate`, greedy (tg)", "pp_eval", "tg_generate_greedy"),
        ("llama-cpp-python", "`create_completion` (greedy)", "pp_create_completion", "tg_create_completion"),
        ("llama-cpp-python", "`create_chat_completion` (greedy)", None, "tg_create_chat_completion"),
    ]
    key: dict[str, float] = {"pp_ref": pp_ref, "tg_ref": tg_ref}
    for impl, what, pp, tg in paths:
        data = s.get(impl)
        if not data:
            continue
        samples = data["samples"]
        ppv = med(samples[pp]) if pp and pp in samples else None
        tgv = med(samples[tg]) if tg in samples else None
        if impl == "pyllama":
            if pp:
                key[pp] = ppv  # type: ignore[assignment]
            key[tg] = tgv  # type: ignore[assignment]
        note = ""
        counts = data.get("tokens", {}).get(tg)
        if counts and min(counts) < 128:
            note = f" ({med(counts):.0f} tokens: it stops at end of generation)"
        rows.append([impl, what + note, fmt(ppv), ratio(ppv, pp_ref), fmt(tgv), ratio(tgv, tg_ref)])
    return rows, key


def per_token_ms(entry: dict[str, Any], mode: str) -> float:
    secs, toks = entry["seconds"][mode], entry["tokens"][mode]
    return med([1000 * s / n for s, n in zip(secs, toks, strict=True)])


def span(values: list[float | None], digits: int = 0) -> str:
    """``lo-hi`` of the values given (``-`` when there are none), or one value when they agree."""
    xs = [x for x in values if x is not None]
    if not xs:
        return "-"
    lo, hi = min(xs), max(xs)
    return fmt(lo, digits) if lo == hi else f"{fmt(lo, digits)}-{fmt(hi, digits)}"


PROMPT_SERVERS = ("llama-server", "pyllama")


def prompt_rows(pr: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    """The prompt-heavy section's tables: seconds (medians over the repetitions; first-token times
    over every request) with the ratio llama-server / pyllama, and the token counts the servers
    reported."""

    def flat(rounds: list[list[Any]]) -> list[Any]:
        return [x for r in rounds for x in r]

    def figures(phase: dict[str, Any]) -> dict[str, float]:
        if not phase.get("wall"):
            return {}
        return {
            "wall": med(phase["wall"]),
            "ttft": med(flat(phase["ttft"])),
            "last": med([max(r) for r in phase["ttft"]]),
        }

    phases = ("cold", "warm", "single", "users")
    got = {n: {ph: figures(pr[n].get(ph, {})) for ph in phases} for n in PROMPT_SERVERS if n in pr}
    for n in got:
        users = pr[n].get("users", {})
        if users.get("ttft"):
            got[n]["users"]["mean_ttft"] = med([sum(r) / len(r) for r in users["ttft"]])
    k = pr["slots"]
    lines = [
        ("cold", "wall", f"{k} chats, cold: wall time, sending all to the last one done"),
        ("cold", "ttft", f"{k} chats, cold: time to first token, median request"),
        ("cold", "last", f"{k} chats, cold: time to first token, last request"),
        ("warm", "wall", f"{k} chats, second identical round (warm): wall time"),
        ("warm", "ttft", f"{k} chats, second identical round (warm): time to first token, median request"),
        ("single", "wall", "one long prompt, cold: wall time"),
        ("single", "ttft", "one long prompt, cold: time to first token"),
    ]
    if pr.get("users"):
        u = pr["users"]
        lines += [
            (
                "users",
                "mean_ttft",
                f"{u['n']} users, {u['wave']} at a time every {u['interval_s']:g} s: mean time to first token",
            ),
            ("users", "wall", f"{u['n']} users, {u['wave']} at a time: wall time, first wave to last reply"),
        ]
    times = []
    for phase, key, what in lines:
        ls = got.get("llama-server", {}).get(phase, {}).get(key)
        py = got.get("pyllama", {}).get(phase, {}).get(key)
        if ls is None and py is None:
            continue
        times.append([what, fmt(ls, 2), fmt(py, 2), ratio(ls, py)])

    def tokens(name: str, phase: str, key: str, how: str) -> str:
        rounds = pr.get(name, {}).get(phase, {}).get(key)
        if not rounds:
            return "-"
        xs = flat(rounds)
        if how == "max":
            known = [x for x in xs if x is not None]
            return fmt(max(known), 0) if known else "-"
        return span(xs)

    counts = []
    for what, phase, key, how in (
        ("prompt tokens of each chat (the server's count)", "cold", "prompt_tokens", "span"),
        ("prompt tokens reused from a cache, cold rounds (most)", "cold", "cached_tokens", "max"),
        ("prompt tokens reused from a cache, warm rounds", "warm", "cached_tokens", "span"),
        ("prompt tokens of the long prompt", "single", "prompt_tokens", "span"),
        ("prompt tokens reused, long prompt (most)", "single", "cached_tokens", "max"),
        ("prompt tokens reused, users (fewest-most)", "users", "cached_tokens", "span"),
        ("completion tokens of each reply", "cold", "completion_tokens", "span"),
    ):
        counts.append([what] + [tokens(n, phase, key, how) for n in PROMPT_SERVERS])
    return times, counts


NEAR_TIE = 1e-3  # top-2 logprob margin under which batched arithmetic may pick the other token


def parting_margin(got: str, solo: dict[str, Any]) -> float | None:
    """Where a reply that differs from the solo run parts from it: the smallest top-2 logprob margin of
    the solo run's tokens up to the one where they part, in all it generated (a stop string it ended
    on included); None when the solo run has no margins."""
    pieces, margins = solo.get("pieces") or [], solo.get("margins") or []
    if not margins:
        return None
    # what the solo run generated, a stop string it ended on included (its text leaves that out)
    want = "".join(pieces)
    d = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    end, smallest = 0, float("inf")
    for piece, margin in zip(pieces, margins, strict=False):
        smallest = min(smallest, margin)
        end += len(piece)
        if end > d:
            break
    return smallest


def parted_at_near_tie(got: str, solo: dict[str, Any]) -> bool:
    """Whether a reply that differs from the solo run parts from it at or after a solo token whose two
    best logprobs were within NEAR_TIE (where batched and solo arithmetic may choose differently)."""
    m = parting_margin(got, solo)
    return m is not None and m < NEAR_TIE


def parting_margins(pr: dict[str, Any], n: str) -> list[float]:
    """For the cold replies of server `n` that differ from their solo runs beyond a near-tie: the solo
    runs' margins where they part."""
    out = []
    for r, w in zip(pr.get(n, {}).get("cold", {}).get("text") or [], pr.get("solo") or [], strict=False):
        for got, want in zip(r, w, strict=False):
            if not isinstance(want, dict) or got == want["text"] or (want["text"] and got.startswith(want["text"])):
                continue
            m = parting_margin(got, want)
            if m is not None and m >= NEAR_TIE:
                out.append(m)
    return sorted(out)


def solo_agreement(pr: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    """Per server: how many cold chat replies equal the solo run of the same body, how many part from it
    at a near-tie, of how many. A server that kept generating past the solo run's end (``ignore_eos``)
    agrees when it starts with it."""
    solo = pr.get("solo")
    if not solo:
        return {}
    out = {}
    for n in PROMPT_SERVERS:
        rounds = pr.get(n, {}).get("cold", {}).get("text")
        if not rounds:
            continue
        equal = near = total = 0
        for r, w in zip(rounds, solo, strict=False):
            for got, want in zip(r, w, strict=False):
                truth = want if isinstance(want, dict) else {"text": want}
                total += 1
                if got == truth["text"] or (truth["text"] and got.startswith(truth["text"])):
                    equal += 1
                elif parted_at_near_tie(got, truth):
                    near += 1
        out[n] = (equal, near, total)
    return out


def same_start(a: str, b: str) -> bool:
    """Whether the shorter text is where the longer one starts (runs that generated more tokens agree
    with those that generated fewer when they start with them)."""
    a, b = a.rstrip(), b.rstrip()
    return a.startswith(b) or b.startswith(a)


def agreement(texts: list[str], truth: dict[str, Any], prefix: bool = False) -> tuple[int, list[float]]:
    """How many of ``texts`` equal the truth's text (or, with ``prefix``, agree with it as far as the
    shorter goes), and for the others the truth's smallest top-2 logprob margin up to where they part."""
    equal, margins = 0, []
    for t in texts:
        if t == truth["text"] or (prefix and same_start(t, truth["text"])):
            equal += 1
        else:
            m = parting_margin(t, truth)
            if m is not None:
                margins.append(m)
    return equal, sorted(margins)


def equal_cell(texts: list[str], truth: dict[str, Any] | None, prefix: bool = False) -> str:
    if not truth or not texts:
        return "-"
    equal, margins = agreement(texts, truth, prefix)
    cell = f"{equal} of {len(texts)}"
    if margins:
        shown = ", ".join(dict.fromkeys(f"{m:.3f}" for m in margins))  # each margin once
        cell += f" (the others part where the plain decode's top-2 margin was {shown})"
    return cell


def show_piece(piece: str) -> str:
    """A token's text in backticks, its spaces and line ends visible."""
    return "`" + piece.replace("\n", "\\n").replace(" ", "␣") + "`"


def spec_section(d: Doc, sp: dict[str, Any], meta: dict[str, Any], targets: list[list[str]]) -> None:
    """Section 7: n-gram drafts on a copy-heavy prompt (pyllama against its own plain decode, and
    llama-speculative-simple against llama-completion), predicted outputs on an editing request, and
    the cost of the drafts when there is nothing to draft."""
    cp, ed, fr = sp["copy"], sp.get("edit"), sp.get("free")
    py = cp["pyllama"]
    plain = med(py["plain"]["decode_tps"])
    types = [t for t in py if t != "plain"]
    n_runs = len(py["plain"]["decode_tps"])
    cpus = meta.get("logical_cpus", "?")
    d(
        "## 7. Speculative decoding and predicted outputs",
        "",
        f"Measured on {sp.get('date', meta.get('date', '?'))} on the machine above ({cpus} logical CPUs), in one",
        f"run (`{sp.get('command', 'python benchmarks/run.py --only spec')}`). Gemma 3 270M, greedy",
        f"(temperature 0), a {sp['n_ctx']}-token context, {meta.get('threads', '?')} threads. Every pyllama run",
        "is a streamed `Llama.complete()` on a `Llama` of its own (the n-gram types keep what they saw",
        "between the requests of one `Llama`, so a repeated request would draft from the one before);",
        "its decode rate is the tokens after the first over the time from the first token to the last.",
        f"Medians over {n_runs} runs; the compared runs alternate one by one inside each process, and the",
        "processes (and llama.cpp's tools) alternate in rounds, so that the machine's drift hits both",
        "sides alike. **Ratios are to the decode without drafts measured in the same run: above 1 is",
        "faster.**",
        "",
    )
    if sp.get("load"):
        d(
            f"The machine's 1-minute load average before each process of the run: {span(sp['load'], 1)} (the",
            f"run's own processes count for about {meta.get('threads', 2)} of it; more is other work on the machine).",
            "",
        )
    d(
        "### Copy-heavy prompt",
        "",
        f"A passage of {cp['passage_words']} words, then its first 20 words again"
        f" ({span(py['plain']['prompt_tokens'])} prompt tokens); each run generates {cp['max_tokens']}",
        "tokens (`ignore_eos`), and the greedy continuation repeats the passage. pyllama: `Llama(path,",
        "speculative=TYPE)` with llama.cpp's default settings for each type. llama.cpp:",
        "`llama-completion`, whose decode time here is its `eval time` plus its `sampling time`, and",
        "`llama-speculative-simple --spec-type ngram-simple`, whose time is its `decoded N tokens in T",
        "seconds` (its loop counts the first token too and runs past `-n` by the last draft). The last",
        "column compares each run's text with pyllama's decode without drafts (llama.cpp's tools as far",
        "as the shorter text goes).",
        "",
    )
    rows = [
        [
            "pyllama, no drafts",
            fmt(plain),
            "1.000",
            "-",
            equal_cell(py["plain"]["text"], cp.get("truth")),
        ]
    ]
    for t in types:
        a = py[t]
        rate = med(a["decode_tps"])
        rows.append(
            [
                f"pyllama, `{t}`",
                fmt(rate),
                ratio(rate, plain),
                f"{med(a['accepted']):.0f} / {med(a['rejected']):.0f}",
                equal_cell(a["text"], cp.get("truth")),
            ]
        )
    lc = cp.get("llama.cpp", {})
    ref_plain = med(lc["llama-completion"]["decode_tps"]) if lc.get("llama-completion") else None
    ref_spec = med(lc["llama-speculative-simple"]["decode_tps"]) if lc.get("llama-speculative-simple") else None
    if ref_plain:
        rows.append(
            [
                "llama.cpp `llama-completion`",
                fmt(ref_plain),
                "1.000",
                "-",
                equal_cell(lc["llama-completion"]["text"], cp.get("truth"), prefix=True),
            ]
        )
    if ref_spec:
        runs = lc["llama-speculative-simple"]["runs"]
        acc = med([r["n_accept"] for r in runs])
        rej = med([r["n_drafted"] - r["n_accept"] for r in runs])
        rows.append(
            [
                "llama.cpp `llama-speculative-simple`, `ngram-simple`",
                fmt(ref_spec),
                ratio(ref_spec, ref_plain),
                f"{acc:.0f} / {rej:.0f}",
                equal_cell(lc["llama-speculative-simple"]["text"], cp.get("truth"), prefix=True),
            ]
        )
    d.table(["", "decode tok/s", "vs no drafts", "draft tokens accepted / rejected", "text equal, runs"], rows)
    rates = {t: med(py[t]["decode_tps"]) for t in types}
    best = max(rates, key=lambda t: rates[t]) if rates else None
    if best:
        line = f"The best type here is `{best}`: {rates[best] / plain:.2f}x pyllama's decode without drafts."
        if ref_plain and ref_spec:
            line += (
                f" llama.cpp's `ngram-simple` gives {ref_spec / ref_plain:.2f}x its own; pyllama's `ngram-simple`"
                f" {rates.get('ngram-simple', float('nan')) / plain:.2f}x. Between the two: pyllama's plain decode"
                f" is {plain / ref_plain:.3f}x llama-completion's, its `ngram-simple`"
                f" {rates.get('ngram-simple', float('nan')) / ref_spec:.3f}x llama-speculative-simple's."
            )
        d(line, "")
    vm = cp.get("verify_ms")
    if vm and "1" in vm:
        big = max(int(k) for k in vm)
        d(
            "What a verified token costs (a bare `Context.decode` after the prompt, with logits for every",
            "token of the batch, as a draft needs): "
            + ", ".join(f"{k} token{'s' if int(k) > 1 else ''}: {v:.2f} ms a token" for k, v in vm.items())
            + f". Drafts that are all accepted therefore make the decode at most {vm['1'] / vm[str(big)]:.1f}x",
            f"as fast with batches of {big} (before the time to draft and to sample): each token of a draft",
            "still needs its logits over Gemma 3's 262,144-token vocabulary.",
            "",
        )
    bc = cp.get("batch_check")
    if bc and bc.get("splits"):
        picks = ", ".join(f"{x['batch']}: {x['picks']} ({x['margin']:+.3f})" for x in bc["splits"])
        d(
            f"Where a run with drafts parts from the plain decode (generated token {bc['position']}: the plain",
            f"decode has {show_piece(bc['plain'])}, the run with drafts {show_piece(bc['drafted'])}), a bare",
            "`Context.decode` of the same tokens, the last N of them in one batch and those before one by",
            "one, picks (batch N: which token, and the plain token's logprob minus the other's): " + picks + ".",
            "The same tokens give other logits in batches of other shapes (llama.cpp's kernels sum in",
            "another order; see `benchmarks/batch_shapes.py`), so verifying a draft in one batch can pick",
            "the other of two close tokens; llama.cpp's own speculative decoding verifies in batches too.",
            "",
        )
    for name, argv in cp.get("argv", {}).items():
        d(f"- {name}: {show([a if a != cp['prompt'] else 'PROMPT' for a in argv])}")
    d("")
    if best:
        r = rates[best] / plain
        targets.append(
            [
                "copy-heavy prompt: the best n-gram type ≥ 3x the decode without drafts",
                f"`{best}` {r:.2f}x",
                verdict(r >= 3),
            ]
        )
        if cp.get("truth"):
            texts = [x for t in types for x in py[t]["text"]]
            equal, _ = agreement(texts, cp["truth"])
            targets.append(
                [
                    "copy-heavy prompt: the n-gram types' text equal to the decode without drafts",
                    f"{equal} of {len(texts)} runs",
                    verdict(equal == len(texts)),
                ]
            )

    if ed and ed.get("pyllama"):
        e = ed["pyllama"]
        off, on = e["plain"], e["prediction"]
        d(
            "### Predicted outputs: an editing request",
            "",
            f"A file of {ed['file_tokens']} tokens in a fenced block, then a header saying that the same file",
            "follows with one change (Monday to Tuesday) and an opening fence; the reply is",
            f"`complete(prompt, max_tokens={ed['kwargs']['max_tokens']}, stop=['```'], temperature=0)`, with",
            "and without `prediction={'type': 'content', 'content': FILE}` (the original file). Gemma 3 270M is",
            "a base model without a chat template, so the request is a completion that it answers by copying.",
        )
        if "copied" in ed:
            made = "makes" if ed.get("changed") else "does not make"
            d(
                f"Its reply without the prediction is {ed['reply_tokens']} tokens and copies {ed['copied']} of the",
                f"file's {ed['file_tokens']} tokens (in order, by `difflib`); it {made} the change asked for.",
            )
        d("")
        w_off, w_on = med(off["wall_s"]), med(on["wall_s"])
        r_off, r_on = med(off["decode_tps"]), med(on["decode_tps"])
        d.table(
            [
                "",
                "reply wall s",
                "decode tok/s",
                "completion tokens",
                "prediction tokens accepted / rejected",
                "text equal, runs",
            ],
            [
                [
                    "without the prediction",
                    fmt(w_off, 2),
                    fmt(r_off),
                    span(off["tokens"]),
                    "-",
                    equal_cell(off["text"], ed.get("truth")),
                ],
                [
                    "with the prediction",
                    fmt(w_on, 2),
                    fmt(r_on),
                    span(on["tokens"]),
                    f"{med(on['accepted']):.0f} / {med(on['rejected']):.0f}",
                    equal_cell(on["text"], ed.get("truth")),
                ],
                ["ratio (with / without)", f"{w_off / w_on:.2f}x as fast", f"{r_on / r_off:.2f}x", "", "", ""],
            ],
        )
        d("The wall time of the reply includes the prompt's evaluation, the same with and without.", "")
        targets.append(
            [
                "predicted outputs: the reply ≥ 2x as fast with the prediction (wall time)",
                f"{w_off / w_on:.2f}x",
                verdict(w_off / w_on >= 2),
            ]
        )
        if ed.get("truth"):
            equal, _ = agreement(on["text"], ed["truth"])
            targets.append(
                [
                    "predicted outputs: the reply equal to the one without",
                    f"{equal} of {len(on['text'])} runs",
                    verdict(equal == len(on["text"])),
                ]
            )

    if fr and fr.get("pyllama"):
        f = fr["pyllama"]
        off, on = f["plain"], f["best"]
        kw = fr["kwargs"]
        n_pairs = len(on["decode_tps"])
        d(
            "### Nothing to draft: free text",
            "",
            f'Story prompts ("{fr["prompts"][0]}" and {len(fr["prompts"]) - 1} others like it),',
            f"{kw['max_tokens']} tokens (`ignore_eos`), temperature 0, with the best type of the copy-heavy prompt",
            f"(`{fr['type']}`) on and off, {n_pairs} times each. At temperature 0 Gemma 3 270M soon repeats",
            "itself in loops, which the n-gram types then draft; a repetition penalty",
            f"({kw.get('repeat_penalty', 1.0)}, on both sides) keeps the text from repeating, so that there is",
            "nothing to draft (the draft counts below say whether anything was). The 3% asked about is less",
            "than this machine's spread from one run to the next, so the target is judged on the runs in",
            "pairs: each pair is the same prompt with the type off and on, one right after the other (in",
            "turn which goes first), and the figure is the median of the pairs' ratios, which drift between",
            "pairs does not move; the ratio of the medians is given too.",
            "",
        )
        a, b = med(off["decode_tps"]), med(on["decode_tps"])
        pairs = med([y / x for x, y in zip(off["decode_tps"], on["decode_tps"], strict=True)])
        drafted = sum(on["accepted"]) + sum(on["rejected"])
        d.table(
            ["", "decode tok/s", "vs off (ratio of the medians)", "vs off (median of the pairs)", "draft tokens"],
            [
                [f"`{fr['type']}` off", fmt(a), "1.000", "1.000", "-"],
                [
                    f"`{fr['type']}` on",
                    fmt(b),
                    ratio(b, a),
                    f"{pairs:.3f}",
                    f"{sum(on['accepted'])} accepted, {sum(on['rejected'])} rejected",
                ],
            ],
        )
        if drafted:
            d(f"The type drafted {drafted} tokens in these runs: the text was not free of repeats everywhere.", "")
        targets.append(
            [
                "nothing to draft: the best type at most 3% slower",
                f"{pairs:.3f}x (pairs), {b / a:.3f}x (medians)",
                verdict(pairs >= 0.97),
            ]
        )


def write(res: dict[str, Any], doc: Path = DOC, only: Collection[str] | None = None) -> Path:
    """Writes the report to ``doc`` and its plots to ``img/`` beside it; returns ``doc``.

    Without ``only``, the page is the report of ``res`` (the notes kept). With ``only``, the sections
    named there are written from ``res``; when the page already holds other sections, the page is kept
    and only these are put in: each replaces its own section or goes in at its place, and their rows
    of the Peak RSS and Targets tables replace the rows of the same name or are added. The rest of the
    page (its other sections, the machine, the notes) stays as it was."""
    keys = [k for k in SECTIONS if k in res and (only is None or k in only)]
    text = render({"meta": res.get("meta", {}), **{k: res[k] for k in keys}}, doc)
    if only is not None and doc.exists():
        old = doc.read_text()
        rendered = {key for key, _ in blocks(text)[1]}
        if any(key in SECTIONS and key not in rendered for key, _ in blocks(old)[1]):
            text = splice(old, text)
    doc.write_text(text)
    return doc


# The sections in the order of the page, and the beginning of each one's title.
SECTIONS = {
    "speed": "Prompt and decode speed",
    "overhead": "Per-token overhead",
    "ttft": "Second-turn time to first token",
    "server": "Server: concurrent streaming clients",
    "prompt": "Server: prompt-heavy load",
    "media": "An image in the prompt",
    "spec": "Speculative decoding and predicted outputs",
}
PAGE = [*SECTIONS, "rss", "targets"]
TITLES = {**SECTIONS, "rss": "Peak RSS", "targets": "Targets"}


def block_key(heading: str) -> str | None:
    """The section a ``## `` heading starts (a key of TITLES), or None."""
    title = re.sub(r"^## (\d+\. )?", "", heading)
    return next((k for k, t in TITLES.items() if title.startswith(t)), None)


def blocks(text: str) -> tuple[list[str], list[tuple[str | None, list[str]]], str]:
    """A page cut into its lines before the first ``## `` heading, its blocks (each heading's section
    key and lines, up to the next heading), and the notes block with what follows it."""
    head, notes = text, ""
    if NOTES_BEGIN in text:
        head, rest = text.split(NOTES_BEGIN, 1)
        notes = NOTES_BEGIN + rest
    lead: list[str] = []
    out: list[tuple[str | None, list[str]]] = []
    for line in head.split("\n"):
        if line.startswith("## "):
            out.append((block_key(line), [line]))
        elif out:
            out[-1][1].append(line)
        else:
            lead.append(line)
    return lead, out, notes


def merge_table(old: list[str], new: list[str]) -> list[str]:
    """``old``'s block with the table rows of ``new``'s: a row replaces the row of the same first cell,
    the others are added at the end of the table."""

    def rows(lines: list[str]) -> list[int]:
        at = [i for i, line in enumerate(lines) if line.startswith("|")]
        return at[2:]  # past the header and its rule

    out = list(old)
    old_rows = rows(out)
    if not old_rows:
        return out
    first = {out[i].split("|")[1].strip(): i for i in old_rows}
    end = old_rows[-1] + 1
    for i in rows(new):
        name = new[i].split("|")[1].strip()
        if name in first:
            out[first[name]] = new[i]
        else:
            out.insert(end, new[i])
            end += 1
    return out


def splice(old: str, new: str) -> str:
    """``old`` with the sections that ``new`` holds put in (see ``write``)."""
    lead, page, notes = blocks(old)
    for key, lines in blocks(new)[1]:
        if key is None:
            continue
        at = next((i for i, (k, _) in enumerate(page) if k == key), None)
        if at is not None:
            page[at] = (key, merge_table(page[at][1], lines) if key in ("rss", "targets") else lines)
            continue
        later = [i for i, (k, _) in enumerate(page) if k in PAGE and PAGE.index(k) > PAGE.index(key)]
        page.insert(later[0] if later else len(page), (key, lines))
    # each section's number is its place in PAGE (as the full page numbers them)
    for key, lines in page:
        if key in PAGE and re.match(r"## \d+\. ", lines[0]):
            lines[0] = re.sub(r"^## \d+\. ", f"## {PAGE.index(key) + 1}. ", lines[0])
    return "\n".join(lead + [line for _, lines in page for line in lines]) + notes


def render(res: dict[str, Any], doc: Path = DOC) -> str:
    """The page for ``res`` (the notes kept from ``doc``); its plots go to ``img/`` beside ``doc``."""
    img = doc.parent / "img"
    meta = res.get("meta", {})
    d = Doc()
    d(
        "# Benchmarks",
        "",
        "pyllama against llama.cpp's own tools (`llama-bench`, `llama-completion`, `llama-server`,",
        "`llama-speculative-simple`, built from the same vendored commit with the same CPU flags) and",
        "against llama-cpp-python 0.3.35 (the same llama.cpp commit, built from source with the same",
        "flags), on one machine, in one run, with the same model files and thread count. One command runs",
        "everything, builds the references the first time (about 15 minutes on 2 cores) and rewrites this",
        "page and its plots (a run of some sections rewrites only those):",
        "",
        "```bash",
        "pip install -e '.[bench]'",
        "python benchmarks/run.py                      # all sections (about 25 minutes on 2 cores)",
        "python benchmarks/run.py --only speed,server  # some of them; --help lists the options",
        "```",
        "",
        "Figures are medians over the measured repetitions; a warm-up run before them is not counted.",
        "Ratios are pyllama (or llama-cpp-python) over llama.cpp measured in the same run, so above 1 is",
        "faster than llama.cpp for speeds. Every measurement runs in a process of its own; its peak RSS",
        "comes from `wait4`. The raw samples are in `benchmarks/.work/results.json`.",
        "",
        "## The machine",
        "",
    )
    d.table(
        ["", ""],
        [
            ["CPU", f"{meta.get('cpu', '?')} ({meta.get('logical_cpus', '?')} logical CPUs)"],
            ["System", meta.get("system", "?")],
            ["Threads", str(meta.get("threads", "?"))],
            ["CPU flags of every build", f"`-march=native {meta.get('cpu_flags', '')}` (Release)"],
            *([["GPU", ", ".join(meta["gpus"])]] if meta.get("gpus") else []),
            *([["CMake arguments of every build", f"`{meta['cmake_args']}`"]] if meta.get("cmake_args") else []),
            ["pyllama", f"{meta.get('pyllama', '?')}, llama.cpp {str(meta.get('llama_cpp_commit', '?'))[:9]}"],
            [
                "Models",
                f"Gemma 3 270M Q4_K_M (`{meta.get('models', {}).get('gemma', '?')}`); the tests' tiny random llama",
            ],
            ["Date", meta.get("date", "?")],
            ["Repetitions", str(meta.get("reps", "?"))],
        ],
    )

    targets: list[list[str]] = []

    if "speed" in res:
        s = res["speed"]
        rows, key = speed_rows(s)
        d(
            "## 1. Prompt and decode speed (pp512, tg128)",
            "",
            "Gemma 3 270M, as `llama-bench` measures them: a context of n_prompt (or n_gen) tokens,",
            "n_batch 2048, n_ubatch 512; pp512 is one batch of 512 random tokens, tg128 is 128 single-token",
            "decodes. pyllama's greedy paths also pick each token (argmax), which `llama-bench` does not.",
            "`Llama.complete`/`chat` tg128 is end to end: a short prompt, then 128 tokens, timed around the call.",
            "",
            show(s["argv"]),
            "",
        )
        d.table(["implementation", "path", "pp512 tok/s", "ratio", "tg128 tok/s", "ratio"], rows)
        bpp, btg = s["llama-bench"]["pp"]["samples"], s["llama-bench"]["tg"]["samples"]
        d(
            f"How much the machine itself varies: `llama-bench`'s own {len(bpp)} samples in this run range over",
            f"{min(bpp):.0f}-{max(bpp):.0f} tok/s (pp512) and {min(btg):.1f}-{max(btg):.1f} tok/s (tg128); their",
            f"interquartile ranges are {p(bpp, 0.25):.0f}-{p(bpp, 0.75):.0f} and "
            f"{p(btg, 0.25):.1f}-{p(btg, 0.75):.1f}.",
            "",
        )
        pp, tg = key.get("pp_context_decode"), key.get("tg_generator_greedy")
        if pp and tg:
            targets.append(
                [
                    "greedy prompt and decode speed ≥ 0.98 of llama-bench",
                    f"pp {pp / key['pp_ref']:.3f}, tg {tg / key['tg_ref']:.3f}",
                    verdict(pp / key["pp_ref"] >= 0.98 and tg / key["tg_ref"] >= 0.98),
                ]
            )

    if "overhead" in res:
        o = res["overhead"]
        n = o["n"]
        d(
            f"## 2. Per-token overhead ({n} tokens)",
            "",
            f"End-to-end time to generate {n} tokens from a short prompt with llama.cpp's default sampler",
            "chain (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, no repetition penalty), divided by",
            "the tokens generated. For `llama-completion` it is its own `total time` (from after its warm-up",
            "to the end, prompt and printing included); for the bindings, the wall time around the call.",
            "pyllama and `llama-completion` ignore end-of-generation; llama-cpp-python has no such option, so",
            "its runs may stop earlier and are divided by the tokens they generated. The tiny model (2",
            "layers, 64 wide, 32k vocabulary) makes the model's own work nearly vanish, so what is left is",
            "each implementation's per-token cost.",
            "",
        )
        rows = []
        chart: dict[str, dict[str, float]] = {}
        for label, title in (("gemma", "Gemma 3 270M"), ("tiny", "tiny llama")):
            if label not in o:
                continue
            e = o[label]
            ref = med([r["total_ms"] / (r["eval_runs"] + 1) for r in e["llama-completion"]])
            chart[title] = {"llama-completion": ref}
            rows.append([title, "llama.cpp `llama-completion`", fmt(ref, 3), "1.000", "-"])
            for impl in ("pyllama", "llama-cpp-python"):
                if impl not in e:
                    continue
                for mode, what in (("complete", "non-streamed"), ("complete_stream", "streamed")):
                    ms = per_token_ms(e[impl], mode)
                    toks = med(e[impl]["tokens"][mode])
                    rows.append([title, f"{impl} {what}", fmt(ms, 3), ratio(ref, ms), f"{toks:.0f}"])
                    chart[title][f"{impl} {what}"] = ms
                if impl == "pyllama":
                    ms = per_token_ms(e[impl], "complete")
                    targets.append(
                        [
                            f"{title}: default sampler chain ≥ 0.98 of llama-completion",
                            f"{ref / ms:.3f}",
                            verdict(ref / ms >= 0.98),
                        ]
                    )
                    if "llama-cpp-python" in e:
                        lcp = per_token_ms(e["llama-cpp-python"], "complete")
                        targets.append(
                            [f"{title}: end to end faster than llama-cpp-python", f"{lcp / ms:.2f}x", verdict(lcp > ms)]
                        )
        d.table(["model", "implementation", "ms per token", "speed vs llama.cpp", "tokens"], rows)
        d(show(o["gemma"]["argv"]), "")
        if chart:
            plot_overhead(chart, img)
            d("![ms per token](img/bench_overhead.png)", "")

    if "ttft" in res:
        t = res["ttft"]
        py = t["pyllama"]
        second, only, whole = med(py["second_turn"]), med(py["new_turn_only"]), med(py["whole_prompt"])
        n_prompt, n_cached = py["prompt_and_cached"][0]
        d(
            "## 3. Second-turn time to first token",
            "",
            f"Gemma 3 270M, a conversation whose first turn is {py['first_turn_tokens']} prompt tokens and a",
            f"32-token reply; the second turn's prompt is {n_prompt} tokens, of which {n_cached} are reused",
            "from the first turn. Time to first token is `chat(..., max_tokens=1)` timed around the call",
            "(template, tokenization, prefix match, evaluation, one sample). The reference evaluates only",
            "the new tokens on top of the history in a bare `Context` and samples one token.",
            "",
        )
        rows = [
            ["pyllama `Llama.chat`, second turn", fmt(1000 * second), ratio(second, only)],
            ["only the new turn's tokens (bare `Context.decode`)", fmt(1000 * only), "1.000"],
            ["the whole prompt evaluated again (no reuse)", fmt(1000 * whole), ratio(whole, only)],
        ]
        if "llama-cpp-python" in t:
            lcp = med(t["llama-cpp-python"]["second_turn"])
            rows.append(["llama-cpp-python `create_chat_completion`, second turn", fmt(1000 * lcp), ratio(lcp, only)])
        d.table(["", "ms", "vs new turn only"], rows)
        targets.append(
            ["second-turn TTFT ≤ 1.2x the new turn alone", f"{second / only:.2f}x", verdict(second / only <= 1.2)]
        )

    if "server" in res:
        sv = res["server"]
        names = [n for n in ("pyllama", "llama-server", "llama-cpp-python") if n in sv]
        levels = sorted({int(k) for n in names for k in sv[n]["levels"]})
        d(
            "## 4. Server: concurrent streaming clients",
            "",
            f"Gemma 3 270M, {sv['slots']} parallel slots where the server has them (llama-cpp-python's",
            "server runs one request at a time; it is started with `--interrupt_requests False`, since by",
            "default a new request cuts the running stream short), a",
            f"{sv['n_ctx']}-token context, streamed `/v1/completions` of {sv['max_tokens']} tokens with the",
            f"default sampler settings and `ignore_eos`. Each client sends {sv['rounds']} requests one after",
            "another; the levels are run 3 times, alternating between the servers, which all stay up.",
            "Throughput is all completion tokens over the wall time (tokens as the server's `usage` counts",
            "them, or, for llama-cpp-python, which reports none when streaming and has no `ignore_eos`, the",
            "streamed text tokenized again); latency is each request's, from sending to its last event.",
            "",
        )
        rows = []
        thr: dict[str, dict[int, float]] = {}
        for lv in levels:
            row = [str(lv)]
            for n in names:
                L = sv[n]["levels"].get(str(lv))
                if not L:
                    row += ["-", "-", "-"]
                    continue
                tps = med([tk / s for tk, s in zip(L["tokens"], L["seconds"], strict=True)])
                thr.setdefault(n, {})[lv] = tps
                row += [fmt(tps), fmt(p(L["latency"], 0.5), 2), fmt(p(L["latency"], 0.95), 2)]
            rows.append(row)
        header = ["clients"]
        for n in names:
            header += [f"{n} tok/s", "p50 s", "p95 s"]
        d.table(header, rows)
        for n in names:
            d(f"- {n}: {show(sv[n]['argv'])}")
        d("", "![tokens/s against concurrent clients](img/bench_server.png)", "")
        plot_server(thr, img)
        at = 8 if 8 in levels else max(levels)
        if "pyllama" in thr and "llama-server" in thr:
            r = thr["pyllama"][at] / thr["llama-server"][at]
            targets.append([f"server at {at} clients ≥ 0.95x llama-server", f"{r:.2f}x", verdict(r >= 0.95)])
        if "pyllama" in thr and "llama-cpp-python" in thr:
            r = thr["pyllama"][at] / thr["llama-cpp-python"][at]
            targets.append([f"server at {at} clients ≥ 3x llama-cpp-python's", f"{r:.2f}x", verdict(r >= 3)])

    if "prompt" in res:
        pr = res["prompt"]
        times, counts = prompt_rows(pr)
        sys_tokens = span(pr["system_tokens"] + pr["single_tokens"])
        d(
            "## 5. Server: prompt-heavy load",
            "",
            f"Gemma 3 270M, llama-server and pyllama's server, {pr['slots']} parallel slots, a {pr['n_ctx']}-token",
            f"context ({pr['n_ctx'] // pr['slots']} per slot), the same threads, n_batch 2048 and n_ubatch 512.",
            f"{pr['slots']} streamed `/v1/chat/completions` are sent at once; they share one system prompt of",
            f"{sys_tokens} tokens (deterministic text, counted with the model's vocabulary, without the chat",
            f"template) and differ in their user turns; each asks for {pr['max_tokens']} tokens, greedy, with",
            "`ignore_eos`. The wall time runs from sending all of them to the last one's end; time to first",
            "token is each request's, to its first non-empty delta. The same round is then sent again at once",
            "(warm: each slot may still hold its prompt). The long prompt is one such chat on its own.",
            "",
        )
        if pr.get("cold") == "restart":
            d(
                "**Cold** is guaranteed by restarting: each repetition starts each server anew for each of its",
                "two measurements (the concurrent rounds, then the long prompt), and a new process has empty KV",
                "cells and an empty prompt cache. Before measuring, each new process serves one unmeasured",
                "completion of a few tokens whose prompt is token ids without BOS (llama-server decodes a warm-up",
                "batch while it starts, pyllama does not; this evens that out); every measured chat starts with",
                "BOS, so no slot holds a prefix of it. On top of that, every repetition and measurement has a",
                "system prompt text of its own, different from its first word on. The second table gives the",
                "prompt tokens each server says it reused (`prompt_tokens_details.cached_tokens`).",
                "",
            )
        d(
            f"Medians over {pr['reps']} repetitions; the two servers' measurements alternate, and their order",
            "is swapped every other repetition. **The ratio is llama-server's time over pyllama's: above 1,",
            "pyllama is faster; below 1, llama-server is.**",
            "",
        )
        d.table(["", "llama-server s", "pyllama s", "llama-server / pyllama"], times)
        d.table(["tokens", "llama-server", "pyllama"], counts)
        made = {
            n: {x for r in pr[n].get("cold", {}).get("completion_tokens", []) for x in r}
            for n in PROMPT_SERVERS
            if n in pr
        }
        if len(made) == 2 and made["llama-server"] != made["pyllama"]:
            d(
                "The two servers did not generate the same number of tokens (last row): a reply can end at a",
                "stop string of the chat template even with `ignore_eos`, so the one with fewer tokens had fewer",
                "decode steps to do; that matters most in the warm round, which is mostly decoding.",
                "",
            )
        agree = solo_agreement(pr)
        if agree:
            d(
                "Each cold chat's reply against its solo run (the same request alone, on a `Llama` of one",
                "sequence that evaluates the whole prompt afresh, in the benchmark's process). Batched and",
                "solo arithmetic are not bit-identical, so a reply may part from the solo run where the solo",
                f"run's two best tokens were within {NEAR_TIE:g} in logprob (a near-tie); the rest must be equal:",
                "",
            )
            d.table(
                ["", "equal to the solo run", "parted at a near-tie", "differ otherwise", "margins where those part"],
                [
                    [
                        n,
                        f"{a} of {t}",
                        str(k),
                        str(t - a - k),
                        ", ".join(f"{m:.3f}" for m in parting_margins(pr, n)) or "-",
                    ]
                    for n, (a, k, t) in agree.items()
                ],
            )
        for n in PROMPT_SERVERS:
            if n in pr and pr[n].get("argv"):
                d(f"- {n}: {show(pr[n]['argv'])}")
        d("")
        ls_py = {n: pr[n] for n in PROMPT_SERVERS if n in pr}
        if len(ls_py) == 2:
            cold = [med(ls_py[n].get("cold", {}).get("wall") or [0.0]) for n in PROMPT_SERVERS]
            if all(cold):
                r = cold[1] / cold[0]
                targets.append(
                    [f"{pr['slots']} chats, cold: pyllama's wall ≤ 0.2x llama-server's", f"{r:.2f}x", verdict(r <= 0.2)]
                )
            ttft = [ls_py[n].get("users", {}).get("ttft") for n in PROMPT_SERVERS]
            if all(ttft):
                m = [med([sum(x) / len(x) for x in t]) for t in ttft if t]
                r = m[1] / m[0]
                targets.append(
                    ["users in waves: pyllama's mean TTFT ≤ 0.3x llama-server's", f"{r:.2f}x", verdict(r <= 0.3)]
                )
        if "pyllama" in agree:
            a, k, t = agree["pyllama"]
            targets.append(
                [
                    "each cold chat's reply equal to its solo run up to a near-tie (pyllama)",
                    f"{a} equal, {k} at a near-tie, {t - a - k} differ, of {t}",
                    verdict(a + k == t),
                ]
            )

    if "media" in res and res["media"].get("pyllama"):
        me = res["media"]
        ref, mine = me["llama-mtmd-cli"], me["pyllama"]
        d(
            "## 6. An image in the prompt",
            "",
            "The tiny llama with a random-weight Gemma 3 vision projector (448-pixel images, 1,024",
            f"patches, six 256-wide layers: {mine['n_image_tokens']} image tokens) and llama.cpp's",
            f"`tools/mtmd/test-1.jpeg`; a ChatML prompt of {mine['n_prompt']} tokens with the image.",
            "",
            "- Time to first token, each in a fresh process set up as llama-mtmd-cli sets itself up (a",
            "  warm-up encode and a warm-up decode), the image read and the prompt tokenised: for",
            "  llama-mtmd-cli its `prompt eval time`, which llama.cpp times from the first decode to the",
            "  first sample (the encode included); for pyllama `Engine.submit(chunks)` until the first",
            "  token, through the generation core.",
            "- Image encode, again and again in one process (the first of each process not kept): for",
            "  llama-mtmd-cli its chat mode with several copies of the image in one message, each encoded",
            "  on its own (its `mtmd batch encoding done in` lines); for pyllama `Projector.encode`.",
            "",
            f"Medians over {len(mine['ttft_ms'])} and {len(mine['encode_ms'])} runs, alternating in rounds.",
            "**The ratio is llama-mtmd-cli's time over pyllama's: above 1, pyllama is faster.**",
            "",
        )
        rows = []
        for key, label, goal in (
            ("encode_ms", "image encode", "image encode"),
            ("ttft_ms", "time to first token", "time to first token with an image"),
        ):
            a, b = med(ref[key]), med(mine[key])
            rows.append([label, fmt(a, 1), fmt(b, 1), f"{a / b:.3f}"])
            targets.append([f"{goal}: pyllama ≥ 0.98x llama-mtmd-cli", f"{a / b:.2f}x", verdict(a / b >= 0.98)])
        d.table(["", "llama-mtmd-cli ms", "pyllama ms", "llama-mtmd-cli / pyllama"], rows)
        d(f"- llama-mtmd-cli: {show(me['argv'])}", "")

    if "spec" in res:
        spec_section(d, res["spec"], res.get("meta", {}), targets)

    rss = peak_rss_rows(res)
    if rss:
        d("## 8. Peak RSS", "", "Each process's peak resident memory (MiB).", "")
        d.table(["measurement", "llama.cpp", "pyllama", "llama-cpp-python"], rss)

    if targets:
        d("## Targets", "")
        d.table(["target", "measured", ""], targets)

    d(NOTES_BEGIN, *old_notes(doc), NOTES_END, "")
    return "\n".join(d.lines)


def peak_rss_rows(res: dict[str, Any]) -> list[list[str]]:
    rows = []
    if "speed" in res:
        s = res["speed"]
        rows.append(
            [
                "pp512 + tg128 (speed section)",
                fmt(s.get("llama-bench_peak_rss_mib"), 0),
                fmt(s.get("pyllama", {}).get("peak_rss_mib"), 0),
                fmt(s.get("llama-cpp-python", {}).get("peak_rss_mib"), 0),
            ]
        )
    if "overhead" in res:
        for label in ("gemma", "tiny"):
            e = res["overhead"].get(label)
            if e:
                rows.append(
                    [
                        f"{res['overhead']['n']} tokens, {label}",
                        fmt(max(r["peak_rss_mib"] for r in e["llama-completion"]), 0),
                        fmt(e.get("pyllama", {}).get("peak_rss_mib"), 0),
                        fmt(e.get("llama-cpp-python", {}).get("peak_rss_mib"), 0),
                    ]
                )
    if "ttft" in res:
        t = res["ttft"]
        rows.append(
            [
                "second-turn TTFT (4096-token context)",
                "-",
                fmt(t["pyllama"].get("peak_rss_mib"), 0),
                fmt(t.get("llama-cpp-python", {}).get("peak_rss_mib"), 0),
            ]
        )
    if "server" in res:
        sv = res["server"]
        rows.append(
            [
                f"server, {sv['slots']} slots, {sv['n_ctx']}-token context",
                fmt(sv.get("llama-server", {}).get("peak_rss_mib"), 0),
                fmt(sv.get("pyllama", {}).get("peak_rss_mib"), 0),
                fmt(sv.get("llama-cpp-python", {}).get("peak_rss_mib"), 0),
            ]
        )
    if "media" in res and res["media"].get("pyllama"):
        me = res["media"]
        rows.append(
            [
                "an image in the prompt (tiny llama)",
                fmt(me["llama-mtmd-cli"].get("peak_rss_mib"), 0),
                fmt(me["pyllama"].get("peak_rss_mib"), 0),
                "-",
            ]
        )
    if "spec" in res and res["spec"].get("copy", {}).get("pyllama"):
        cp = res["spec"]["copy"]
        rows.append(
            [
                "n-gram drafts, copy-heavy prompt",
                fmt(cp.get("llama.cpp", {}).get("llama-speculative-simple", {}).get("peak_rss_mib"), 0),
                fmt(cp.get("pyllama_peak_rss_mib"), 0),
                "-",
            ]
        )
    if "prompt" in res:
        pr = res["prompt"]
        rows.append(
            [
                f"prompt-heavy server, {pr['slots']} slots, {pr['n_ctx']}-token context",
                fmt(pr.get("llama-server", {}).get("peak_rss_mib"), 0),
                fmt(pr.get("pyllama", {}).get("peak_rss_mib"), 0),
                "-",
            ]
        )
    return rows


def old_notes(doc: Path) -> list[str]:
    if not doc.exists():
        return []
    text = doc.read_text()
    if NOTES_BEGIN not in text or NOTES_END not in text:
        return []
    inner = text.split(NOTES_BEGIN, 1)[1].split(NOTES_END, 1)[0]
    return inner.strip("\n").splitlines()


def plot_server(thr: dict[str, dict[int, float]], img: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for name, series in thr.items():
        xs = sorted(series)
        ax.plot(xs, [series[x] for x in xs], marker="o", label=name)
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("aggregate completion tokens/s")
    ax.set_xticks(sorted({x for s in thr.values() for x in s}))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Server throughput, Gemma 3 270M")
    fig.tight_layout()
    out = img / "bench_server.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_overhead(chart: dict[str, dict[str, float]], img: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(chart), figsize=(5.2 * len(chart), 3.6), dpi=110)
    if len(chart) == 1:
        axes = [axes]
    for ax, (title, values) in zip(axes, chart.items(), strict=True):
        names = list(values)
        ax.barh(names, [values[n] for n in names], color=[f"C{i}" for i in range(len(names))])
        ax.invert_yaxis()
        ax.set_xlabel("ms per generated token")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = img / "bench_overhead.png"
    fig.savefig(out)
    plt.close(fig)
    return out
