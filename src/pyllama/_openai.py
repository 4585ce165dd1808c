"""OpenAI's shapes: usage, finish reasons, logprobs, merged choices, response formats, stops."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import _core
from .errors import invalid
from .sampling import SAMPLING
from .streams import Gen


def logprob_entry(token_text: bytes, logprob: float, top: list[dict[str, Any]] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "token": token_text.decode("utf-8", "replace"),
        "logprob": logprob,
        "bytes": list(token_text),
    }
    if top is not None:
        entry["top_logprobs"] = top
    return entry


def nth_seed(seed: int | None, i: int) -> int | None:
    """The seed of choice i: the request's own for the first, then the next ones."""
    return None if seed is None else (seed + i) & 0xFFFFFFFF


def merge_choices(outs: list[dict[str, Any]], *, prompt_once: bool) -> dict[str, Any]:
    """Several single-choice responses as one, choices indexed in order; ``prompt_once``: the
    choices share one prompt (chat's n), which usage counts once."""
    merged = dict(outs[0])
    merged["choices"] = []
    usage = empty_usage()
    for i, out in enumerate(outs):
        choice = dict(out["choices"][0])
        choice["index"] = i
        merged["choices"].append(choice)
        if not prompt_once or i == 0:
            usage["prompt_tokens"] += out["usage"]["prompt_tokens"]
            usage["prompt_tokens_details"]["cached_tokens"] += out["usage"]["prompt_tokens_details"]["cached_tokens"]
        usage["completion_tokens"] += out["usage"]["completion_tokens"]
        for key in DRAFT_KEYS:
            usage["completion_tokens_details"][key] += out["usage"]["completion_tokens_details"][key]
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    merged["usage"] = usage
    return merged


def finish_reason(reason: str, has_calls: bool) -> str:
    """OpenAI's finish_reason: "length" when max_tokens (or the context) cut the reply, even inside a
    call, whose arguments may then be incomplete; else "tool_calls" when the reply made calls."""
    if reason == "length":
        return reason
    if reason == "cancelled":
        return "stop"  # OpenAI has no "cancelled": the reply ended early, at the caller's request
    return "tool_calls" if has_calls else reason


def check_sampling(sampling: dict[str, Any]) -> None:
    unknown = set(sampling) - set(SAMPLING)
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")


MAX_CHOICES = 128  # n, as OpenAI allows


def stop_list(stop: str | Sequence[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise TypeError(f"stop[{i}]: stop strings must be non-empty str, got {s!r}")
    return stops


def response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return response_format.get("schema") or {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            where = "response_format.json_schema"
            raise invalid(f"{where}: must be an object with a 'schema'", where)
        schema = spec.get("schema", {"type": "object"})
        return schema if isinstance(schema, dict) else None
    where = "response_format.type"
    raise invalid(f"{where}: {kind!r} is not 'text', 'json_object' or 'json_schema'", where)


DRAFT_KEYS = ("accepted_prediction_tokens", "rejected_prediction_tokens")


def empty_usage() -> dict[str, Any]:
    return {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": dict.fromkeys(DRAFT_KEYS, 0),
    }


def usage(gen: Gen) -> dict[str, Any]:
    """OpenAI's usage; the drafts of speculative decoding (a prediction's included) as the predicted
    outputs' accepted and rejected tokens."""
    return {
        "prompt_tokens": gen.n_prompt,
        "completion_tokens": gen.n_completion,
        "total_tokens": gen.n_prompt + gen.n_completion,
        "prompt_tokens_details": {"cached_tokens": gen.n_reused},
        "completion_tokens_details": {
            "accepted_prediction_tokens": gen.n_accepted,
            "rejected_prediction_tokens": gen.n_drafted - gen.n_accepted,
        },
    }


def chat_logprobs(gen: Gen, model: _core.Model, n_top: int) -> list[dict[str, Any]]:
    out = []
    for _tok, piece, lp, top in gen.logprobs:
        alts = None
        if n_top >= 0:
            alts = [logprob_entry(model.token_to_piece(t), v, None) for t, v in top]
        out.append(logprob_entry(piece, lp, alts))
    return out


def completion_logprobs(gen: Gen, model: _core.Model, offset: int) -> dict[str, Any]:
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    pos = offset
    for _tok, piece, lp, top in gen.logprobs:
        text = piece.decode("utf-8", "replace")
        tokens.append(text)
        token_logprobs.append(lp)
        top_logprobs.append({model.token_to_piece(t).decode("utf-8", "replace"): v for t, v in top})
        text_offset.append(pos)
        pos += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def attach_parsed(response: dict[str, Any], parse_as: Any) -> None:
    from .tools import parse_model

    choice = response["choices"][0]
    if choice["finish_reason"] == "length":
        raise invalid(
            "the reply was cut at max_tokens: it cannot be parsed as " + getattr(parse_as, "__name__", "the type")
        )
    choice["message"]["parsed"] = parse_model(parse_as, choice["message"].get("content") or "")


def add_usage(total: dict[str, Any], usage: dict[str, Any]) -> None:
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        total[key] += usage[key]
    total["prompt_tokens_details"]["cached_tokens"] += usage["prompt_tokens_details"]["cached_tokens"]
    for key in DRAFT_KEYS:
        total["completion_tokens_details"][key] += usage["completion_tokens_details"][key]


def prediction_text(prediction: Any) -> str:
    """The text of OpenAI's ``prediction={"type": "content", "content": ...}`` (a string or text parts)."""
    if not isinstance(prediction, dict) or prediction.get("type") != "content":
        raise invalid("prediction must be {'type': 'content', 'content': ...}", "prediction")
    content = prediction.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        texts = [p.get("text") for p in content]
        if all(isinstance(t, str) for t in texts):
            return "".join(t for t in texts if isinstance(t, str))
    raise invalid("prediction.content must be a string or a list of text parts", "prediction.content")
