"""OpenAI request bodies checked and mapped onto ``Llama.chat`` / ``Llama.complete`` keywords.

Every check names the field at fault, so that the error the client gets says what to fix
(``{"error": {"param": "temperature", ...}}``). Fields OpenAI defines that change nothing here
(``user``, ``store``, ``metadata``...) are ignored; fields that would change the answer in a way
pyllama cannot honour (``n > 1``, ``audio``...) are refused; fields neither OpenAI nor llama-server
defines are ignored, as llama-server does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import sampling
from .._validate import check_messages, check_tools
from ..errors import InvalidRequestError

__all__ = ["APIError", "chat_kwargs", "completion_kwargs", "embedding_inputs", "infill_request", "rerank_inputs"]


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str | None = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


# Integers beyond these do not fit the engine's types (the sampler's seed is 32 bits unsigned, a token
# id 32 bits signed): refused here, naming the field, rather than failing in the conversion.
SEED_MAX = 2**32 - 1
TOKEN_MAX = 2**31 - 1


# --- field checks ------------------------------------------------------------------------------

Check = Callable[[str, Any], Any]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(lo: float | None = None, hi: float | None = None) -> Check:
    def check(name: str, value: Any) -> float:
        if not _is_number(value):
            raise invalid(name, f"must be a number, not {_kind(value)}", "invalid_type")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise invalid(name, f"{value} is not in [{_bound(lo)}, {_bound(hi)}]")
        return float(value)

    return check


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise invalid(name, f"must be an integer, not {_kind(value)}", "invalid_type")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise invalid(name, f"{value} is not in [{_bound(lo)}, {_bound(hi)}]")
        return value

    return check


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid(name, f"must be a boolean, not {_kind(value)}", "invalid_type")
    return value


def string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise invalid(name, f"must be a string, not {_kind(value)}", "invalid_type")
    return value


def obj(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid(name, f"must be an object, not {_kind(value)}", "invalid_type")
    return value


def array(name: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise invalid(name, f"must be an array, not {_kind(value)}", "invalid_type")
    return value


def strings(name: str, value: Any) -> list[str]:
    for i, item in enumerate(array(name, value)):
        string(f"{name}[{i}]", item)
    return list(value)


def stop(name: str, value: Any) -> str | list[str]:
    if isinstance(value, str):
        return value
    return strings(name, value)


def tool_choice(name: str, value: Any) -> str | dict[str, Any]:
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise invalid(name, f"{value!r} is not 'none', 'auto', 'required' or a function object")
        return value
    return obj(name, value)


def logit_bias(name: str, value: Any) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, bias in obj(name, value).items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(name, f"key {key!r} is not a token id") from None
        if not 0 <= token <= TOKEN_MAX:
            raise invalid(name, f"key {key!r} is not a token id")
        out[token] = number()(f"{name}.{key}", bias)
    return out


def lora(name: str, value: Any) -> list[tuple[int, float]]:
    """llama-server's ``[{"id": int, "scale": number}, ...]`` (a request's or POST /lora-adapters'),
    as (id, scale) pairs; which ids exist is the server's to say."""
    out: list[tuple[int, float]] = []
    for i, item in enumerate(array(name, value)):
        entry = obj(f"{name}[{i}]", item)
        if "id" not in entry:
            raise invalid(f"{name}[{i}].id", "is required", "missing_required_parameter")
        ident = int(integer(0)(f"{name}[{i}].id", entry["id"]))
        scale = number()(f"{name}[{i}].scale", entry.get("scale", 0.0))
        out.append((ident, scale))
    return out


def one_of(*choices: str) -> Check:
    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise invalid(name, f"{value!r} is not one of {', '.join(map(repr, choices))}")
        return str(value)

    return check


def max_tokens(name: str, value: Any) -> int:
    n = int(integer(-1)(name, value))
    if n == 0:
        raise invalid(name, "must be at least 1 (or -1: until the context is full)")
    return n


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _bound(x: float | None) -> str:
    return "-inf" if x is None else str(x)


def _sampling_check(kind: str, lo: float | None, hi: float | None) -> Check:
    if kind == "integer":
        return integer(None if lo is None else int(lo), None if hi is None else int(hi))
    return number(lo, hi) if kind == "number" else strings


# The sampling keywords of Llama.chat/complete (llama-server's names), checked as the one table says.
SAMPLING: dict[str, Check] = {name: _sampling_check(*spec) for name, spec in sampling.SAMPLING.items()}

CHAT: dict[str, Check] = {
    **SAMPLING,
    "max_tokens": max_tokens,
    "prediction": obj,  # OpenAI's predicted outputs; its shape is checked by Llama
    "speculative": boolean,  # off: no drafts from the server's --spec-type for this request
    "lora": lora,  # the adapters' scales for this request (the server's ids)
    "seed": integer(0, SEED_MAX),
    "stop": stop,
    "logit_bias": logit_bias,
    "logprobs": boolean,
    "top_logprobs": integer(0, 20),
    "tools": array,
    "tool_choice": tool_choice,
    "parallel_tool_calls": boolean,
    "response_format": obj,
    "grammar": string,
    "reasoning_effort": string,
    "reasoning_format": one_of("none", "auto", "deepseek", "deepseek-legacy"),
    "enable_thinking": boolean,
    "chat_template_kwargs": obj,
}

COMPLETION: dict[str, Check] = {
    **SAMPLING,
    "max_tokens": max_tokens,
    "prediction": obj,  # OpenAI's predicted outputs; its shape is checked by Llama
    "speculative": boolean,  # off: no drafts from the server's --spec-type for this request
    "lora": lora,  # the adapters' scales for this request (the server's ids)
    "seed": integer(0, SEED_MAX),
    "stop": stop,
    "logit_bias": logit_bias,
    "logprobs": integer(0, 20),
    "echo": boolean,
    "suffix": string,
    "grammar": string,
    "json_schema": obj,
    "ignore_eos": boolean,
}


def _common(body: dict[str, Any], fields: dict[str, Check]) -> tuple[dict[str, Any], bool, bool]:
    """The mapped keywords, ``stream`` and ``stream_options.include_usage``."""
    model = body.get("model")
    if model is not None:
        string("model", model)
    n = body.get("n")
    if n is not None and integer(1)("n", n) != 1:
        raise invalid("n", "only n=1 is supported (send several requests for several choices)", "unsupported_value")
    stream = body.get("stream")
    stream = False if stream is None else boolean("stream", stream)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise invalid("stream_options", "is only allowed when stream is true")
        flag = obj("stream_options", options).get("include_usage")
        include_usage = False if flag is None else boolean("stream_options.include_usage", flag)
    kwargs: dict[str, Any] = {}
    for name, check in fields.items():
        value = body.get(name)
        if value is not None:
            kwargs[name] = check(name, value)
    return kwargs, stream, include_usage


def chat_kwargs(body: dict[str, Any]) -> tuple[list[Any], dict[str, Any], bool, bool]:
    """``(messages, keywords of Llama.chat, stream, include_usage)`` of a chat completion request."""
    if "messages" not in body or body["messages"] is None:
        raise invalid("messages", "is required", "missing_required_parameter")
    messages = array("messages", body["messages"])
    if not messages:
        raise invalid("messages", "must hold at least one message", "empty_array")
    for name in ("functions", "function_call"):
        if body.get(name) is not None:
            raise invalid(name, "is deprecated and not supported: use tools and tool_choice", "unsupported_parameter")
    for name in ("audio", "web_search_options"):
        if body.get(name) is not None:
            raise invalid(name, "is not supported", "unsupported_parameter")
    modalities = body.get("modalities")
    if modalities is not None and strings("modalities", modalities) != ["text"]:
        raise invalid("modalities", "only ['text'] is supported", "unsupported_value")
    kwargs, stream, include_usage = _common(body, CHAT)
    try:  # before the request waits in the queue: a malformed one is answered at once
        check_messages(messages, media=True)
        check_tools(kwargs.get("tools"))
    except InvalidRequestError as e:
        raise APIError(400, str(e), param=e.param) from None
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        kwargs["max_tokens"] = max_tokens("max_completion_tokens", body["max_completion_tokens"])
    if kwargs.get("response_format", {}).get("type") not in (None, "text", "json_object", "json_schema"):
        kind = kwargs["response_format"]["type"]
        raise invalid("response_format.type", f"{kind!r} is not 'text', 'json_object' or 'json_schema'")
    return messages, kwargs, stream, include_usage


def completion_kwargs(body: dict[str, Any]) -> tuple[str | list[int], dict[str, Any], bool, bool]:
    """``(prompt, keywords of Llama.complete, stream, include_usage)`` of a completion request."""
    if "prompt" not in body or body["prompt"] is None:
        raise invalid("prompt", "is required", "missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > 1:
            raise invalid("prompt", "several prompts in one request are not supported", "unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt:
            raise invalid("prompt", "must not be empty")
        prompt = [integer(0, TOKEN_MAX)(f"prompt[{i}]", t) for i, t in enumerate(prompt)]
    elif not isinstance(prompt, str):
        raise invalid("prompt", "must be a string, an array of token ids, or an array of one of these", "invalid_type")
    best_of = body.get("best_of")
    if best_of is not None and integer(1)("best_of", best_of) != 1:
        raise invalid("best_of", "only best_of=1 is supported", "unsupported_value")
    kwargs, stream, include_usage = _common(body, COMPLETION)
    return prompt, kwargs, stream, include_usage


def embedding_inputs(body: dict[str, Any]) -> tuple[list[str], str, int | None]:
    """``(texts, encoding_format, dimensions)`` of an embeddings request."""
    if "input" not in body or body["input"] is None:
        raise invalid("input", "is required", "missing_required_parameter")
    value = body["input"]
    texts = [value] if isinstance(value, str) else array("input", value)
    if not texts:
        raise invalid("input", "must not be empty")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise invalid(
                f"input[{i}]", "must be a string: token arrays are not supported, send the text", "unsupported_value"
            )
    encoding = body.get("encoding_format")
    encoding = "float" if encoding is None else one_of("float", "base64")("encoding_format", encoding)
    dimensions = body.get("dimensions")
    if dimensions is not None:
        dimensions = integer(1)("dimensions", dimensions)
    model = body.get("model")
    if model is not None:
        string("model", model)
    return texts, encoding, dimensions


# llama-server's /infill: the completion fields that apply to a fill-in-the-middle prompt, and its own
# name for max_tokens. Fields of llama-server's that only tune its own scheduling or output
# (cache_prompt, n_indent, t_max_prompt_ms, t_max_predict_ms, response_fields...) are ignored.
INFILL: dict[str, Check] = {
    name: check for name, check in COMPLETION.items() if name not in ("echo", "suffix", "logprobs", "prediction")
}


def _mixed(name: str, value: Any) -> str | list[str | int]:
    """llama-server's mixed prompt: a string, or an array of strings and token ids."""
    if isinstance(value, str):
        return value
    out: list[str | int] = []
    for i, item in enumerate(array(name, value)):
        out.append(item if isinstance(item, str) else integer(0, TOKEN_MAX)(f"{name}[{i}]", item))
    return out


def infill_request(
    body: dict[str, Any],
) -> tuple[str | list[str | int], str | list[str | int], list[tuple[str, str]], str, dict[str, Any], bool]:
    """``(input_prefix, input_suffix, input_extra as (filename, text) pairs, prompt, keywords of
    Llama.complete, stream)`` of an ``/infill`` request."""
    for name in ("input_prefix", "input_suffix"):
        if body.get(name) is None:
            raise invalid(name, "is required", "missing_required_parameter")
    prefix = _mixed("input_prefix", body["input_prefix"])
    suffix = _mixed("input_suffix", body["input_suffix"])
    extra: list[tuple[str, str]] = []
    for i, chunk in enumerate(array("input_extra", body.get("input_extra") or [])):
        where = f"input_extra[{i}]"
        obj(where, chunk)
        if chunk.get("text") is None:
            raise invalid(f"{where}.text", "is required", "missing_required_parameter")
        text = string(f"{where}.text", chunk["text"])
        filename = chunk.get("filename")
        extra.append(("tmp" if filename is None else string(f"{where}.filename", filename), text))
    prompt = body.get("prompt")
    prompt = "" if prompt is None else string("prompt", prompt)
    if body.get("n_probs"):
        raise invalid("n_probs", "token probabilities are not supported on /infill", "unsupported_parameter")
    kwargs, stream, _ = _common({k: v for k, v in body.items() if k != "stream_options"}, INFILL)
    if body.get("n_predict") is not None:
        kwargs["max_tokens"] = max_tokens("n_predict", body["n_predict"])
    kwargs.setdefault("max_tokens", -1)  # llama-server's default: until the end of the text or the context
    return prefix, suffix, extra, prompt, kwargs, stream


def rerank_inputs(body: dict[str, Any]) -> tuple[str, list[str], int | None, bool, bool]:
    """``(query, documents, top_n, tei, return_text)`` of a rerank request: Jina's shape
    (``documents``), or TEI's (``texts``, answered as a bare array, ``return_text``)."""
    if body.get("query") is None:
        raise invalid("query", "is required", "missing_required_parameter")
    query = string("query", body["query"])
    tei = body.get("texts") is not None
    name = "texts" if tei else "documents"
    if body.get(name) is None:
        raise invalid("documents", "is required", "missing_required_parameter")
    documents = strings(name, body[name])
    if not documents:
        raise invalid(name, "must hold at least one document", "empty_array")
    top_n = body.get("top_n")
    if top_n is not None:
        top_n = integer(1)("top_n", top_n)
    return_text = body.get("return_text")
    return_text = False if return_text is None else boolean("return_text", return_text)
    model = body.get("model")
    if model is not None:
        string("model", model)
    return query, documents, top_n, tei, return_text
