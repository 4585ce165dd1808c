"""The ``pyllama`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _core
from .errors import InvalidRequestError
from .models import DefaultModelMissing, resolve_model_path

if TYPE_CHECKING:
    from .llama import Llama
    from .server import ModelSpec


def _info(args: argparse.Namespace) -> int:
    path = resolve_model_path(args.model)
    with _core.Model(str(path), n_gpu_layers=args.n_gpu_layers) as model:
        info = {
            "path": str(path),
            "description": model.description,
            "architecture": model.architecture,
            "name": model.name,
            "n_params": model.n_params,
            "size_bytes": model.size,
            "n_ctx_train": model.n_ctx_train,
            "n_embd": model.n_embd,
            "n_layer": model.n_layer,
            "n_head": model.n_head,
            "n_head_kv": model.n_head_kv,
            "n_vocab": model.n_vocab,
            "vocab_type": model.vocab_type,
            "special_tokens": {
                name: getattr(model, f"token_{name}") for name in ("bos", "eos", "eot", "sep", "nl", "pad")
            },
            "chat_templates": sorted(model.chat_templates),
            "chat_template_caps": _template_caps(model),
        }
        if args.mmproj:
            caps = _core.Projector.capabilities(args.mmproj)
            info["modalities"] = {"text": True, "vision": caps["vision"], "audio": caps["audio"]}
        if args.json:
            info["metadata"] = model.metadata
            print(json.dumps(info, indent=2, ensure_ascii=False))
            return 0
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
        if args.prompt is not None:
            tokens = model.tokenize(args.prompt)
            pieces = [model.token_to_piece(t, special=True).decode("utf-8", "replace") for t in tokens]
            print(f"{'tokens':<{width}}  {tokens}")
            print(f"{'pieces':<{width}}  {pieces}")
    return 0


def _template_caps(model: _core.Model) -> dict[str, bool] | str:
    """What the model's chat template supports (tools, system role...), or why it cannot be used."""
    from .chat import ChatTemplate

    try:
        return dict(ChatTemplate(model).caps)
    except InvalidRequestError as e:  # a template that does not parse or is refused
        return f"unavailable: {e}"


def _system(_: argparse.Namespace) -> int:
    print(f"pyllama {_core.__version__} (llama.cpp {_core.LLAMA_CPP_COMMIT[:9]})")
    print(_core.system_info())
    for dev in _core.devices():
        print(f"device {dev['index']}: {dev['name']} ({dev['type']}) {dev['description']}")
    print(f"GPU offload: {'yes' if _core.supports_gpu_offload() else 'no'}")
    return 0


# --- loading a model --------------------------------------------------------------------------


@contextmanager
def _progress_bar() -> Iterator[Callable[[float], bool] | None]:
    """A tqdm bar for the load on a terminal's stderr; nothing when stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

    bar = tqdm(total=100, desc="loading", unit="%", leave=False, file=sys.stderr, bar_format="{l_bar}{bar}")

    def update(fraction: float) -> bool:
        bar.update(max(0, round(fraction * 100) - bar.n))
        return True

    try:
        yield update
    finally:
        bar.close()


def _chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file of Jinja source, else the source itself or a built-in name."""
    if value is not None and "{" not in value and Path(value).expanduser().is_file():
        return Path(value).expanduser().read_text(encoding="utf-8")
    return value


def _load(args: argparse.Namespace, model: str | None, **extra: Any) -> Llama:
    from .llama import Llama

    path = resolve_model_path(model)
    kwargs = _llama_options(args, **extra)
    with _progress_bar() as progress:
        return Llama(path, progress=progress, **kwargs)


def _llama_options(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The Llama keywords of the model options (_add_model_options) in ``args``, and ``extra``."""
    kwargs: dict[str, Any] = {"n_ctx": args.n_ctx, "n_gpu_layers": args.n_gpu_layers, **extra}
    if args.n_threads is not None:
        kwargs["n_threads"] = args.n_threads
    template = _chat_template(args.chat_template)
    if template is not None:
        kwargs["chat_template"] = template
    if getattr(args, "mmproj", None):
        kwargs["mmproj"] = args.mmproj
        if args.no_mmproj_offload:
            kwargs["mmproj_use_gpu"] = False
    if getattr(args, "draft_model", None):
        kwargs["draft_model"] = args.draft_model
    if getattr(args, "spec_type", None) or getattr(args, "draft_model", None):
        spec: dict[str, Any] = {"type": args.spec_type or "draft-simple"}
        if args.spec_draft_n_max is not None:
            spec["n_max"] = args.spec_draft_n_max
        kwargs["speculative"] = spec
    kwargs.update(_adapter_options(args))
    if getattr(args, "rpc", None):
        kwargs["rpc_servers"] = [e for v in args.rpc for e in v.split(",") if e]
    if getattr(args, "no_repack", False):
        kwargs["repack"] = False
    return kwargs


def _scaled(values: Sequence[str] | None, flag: str) -> list[tuple[str, float]]:
    """``FNAME:SCALE`` items, comma-separated or given several times (llama.cpp's syntax)."""
    out: list[tuple[str, float]] = []
    for value in values or []:
        for item in value.split(","):
            path, sep, scale = item.rpartition(":")
            try:
                number = float(scale)
            except ValueError:
                number = None
            if not sep or not path or number is None:
                raise _UsageError(f"{flag} takes FNAME:SCALE, not {item!r}")
            out.append((path, number))
    return out


def _adapter_options(args: argparse.Namespace) -> dict[str, Any]:
    """Llama keywords of --lora, --lora-scaled, --lora-init-without-apply and the control vectors."""
    out: dict[str, Any] = {}
    lora = [(p, 1.0) for v in getattr(args, "lora", None) or [] for p in v.split(",")]
    lora += _scaled(getattr(args, "lora_scaled", None), "--lora-scaled")
    if getattr(args, "lora_init_without_apply", False):
        lora = [(p, 0.0) for p, _ in lora]  # loaded, at scale 0 until POST /lora-adapters or a request says
    if lora:
        out["lora"] = lora
    vectors = [(p, 1.0) for v in getattr(args, "control_vector", None) or [] for p in v.split(",")]
    vectors += _scaled(getattr(args, "control_vector_scaled", None), "--control-vector-scaled")
    if vectors:
        out["control_vectors"] = vectors
    if getattr(args, "control_vector_layer_range", None):
        out["control_vector_layer_range"] = tuple(args.control_vector_layer_range)
    return out


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--n-ctx", type=int, default=None, metavar="N", help="context size in tokens (default: fitted to memory)"
    )
    parser.add_argument(
        "--n-gpu-layers", type=int, default=-1, metavar="N", help="layers to offload to a GPU (default: all)"
    )
    parser.add_argument(
        "--n-threads", type=int, default=None, metavar="N", help="CPU threads (default: the physical cores)"
    )
    parser.add_argument(
        "--chat-template", metavar="TEMPLATE", help="a Jinja template (source or file) or a built-in name"
    )
    parser.add_argument("--mmproj", metavar="FILE", help="a multimodal projector: images and audio in messages")
    parser.add_argument(
        "--no-mmproj-offload", action="store_true", help="keep the projector on the CPU (default: with the model)"
    )
    parser.add_argument(
        "--draft-model", "-md", metavar="FILE", help="a draft model over the same vocabulary (speculative decoding)"
    )
    parser.add_argument(
        "--spec-type",
        metavar="TYPES",
        help="speculative decoding, llama.cpp's names, comma-separated: ngram-simple, ngram-map-k, ngram-map-k4v, "
        "ngram-mod, ngram-cache, draft-simple (default with --draft-model)",
    )
    parser.add_argument(
        "--spec-draft-n-max", type=int, default=None, metavar="N", help="the most tokens drafted at once"
    )
    parser.add_argument(
        "--rpc",
        action="append",
        metavar="SERVERS",
        help="llama.cpp RPC workers, host:port, comma-separated (`pyllama rpc-server` there): layers go to them",
    )
    parser.add_argument(
        "--no-repack", action="store_true", help="keep the weights as the file has them (llama.cpp's --no-repack)"
    )
    parser.add_argument(
        "--lora", action="append", metavar="FNAME", help="a LoRA adapter (comma-separated or repeated: several)"
    )
    parser.add_argument(
        "--lora-scaled", action="append", metavar="FNAME:SCALE", help="a LoRA adapter with a scale (FNAME:SCALE,...)"
    )
    parser.add_argument(
        "--lora-init-without-apply",
        action="store_true",
        help="load the adapters at scale 0 (a request's lora or POST /lora-adapters applies them)",
    )
    parser.add_argument(
        "--control-vector", action="append", metavar="FNAME", help="a control vector (comma-separated or repeated)"
    )
    parser.add_argument(
        "--control-vector-scaled",
        action="append",
        metavar="FNAME:SCALE",
        help="a control vector with a strength (FNAME:SCALE,...)",
    )
    parser.add_argument(
        "--control-vector-layer-range",
        nargs=2,
        type=int,
        metavar=("START", "END"),
        help="the layers the control vectors apply to, inclusive (default: all)",
    )


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N", help="the most tokens a reply may have")
    parser.add_argument("--temperature", type=float, default=None, metavar="T", help="sampling temperature (0: greedy)")
    parser.add_argument("--seed", type=int, default=None, metavar="N", help="sampling seed, for repeatable replies")
    parser.add_argument("--system", metavar="TEXT", help="a system message")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    values = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    return {k: v for k, v in values.items() if v is not None}


def _text_output() -> None:
    """Model text may hold characters the terminal's encoding lacks: replace them, never fail."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="replace")


# --- run -----------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    words = list(args.words)
    if len(words) > 2:
        raise _UsageError("run takes [MODEL] PROMPT: quote a prompt of several words")
    model, prompt = (None, words[0]) if len(words) == 1 else (words[0], words[1])
    if prompt == "-":
        prompt = sys.stdin.read()
    _text_output()
    with _load(args, model) as llm:
        if _lacks_template(args, llm):
            if args.image or args.audio:
                raise _UsageError(f"--image and --audio need a chat template and {llm.model_name} has none")
            if args.system:
                raise _UsageError(
                    f"--system needs a chat template and {llm.model_name} has none: give one with --chat-template"
                )
            _note(
                f"{llm.model_name} has no chat template (a base model): completing the prompt as text; "
                "--chat-template chatml would chat with it instead"
            )
            return _complete(llm, prompt, args)
        messages: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
        parts = _media_parts(args)
        messages.append({"role": "user", "content": [*parts, {"type": "text", "text": prompt}] if parts else prompt})
        if args.json:
            print(json.dumps(llm.chat(messages, **_sampling(args)), indent=2, ensure_ascii=False))
            return 0
        stream = llm.chat(messages, stream=True, **_sampling(args))
        return _stream_out(stream, lambda choice: choice["delta"].get("content"))


def _media_parts(args: argparse.Namespace) -> list[dict[str, Any]]:
    from .media import file_part

    try:
        return [file_part(p, "image") for p in args.image or []] + [file_part(p, "audio") for p in args.audio or []]
    except OSError as e:
        raise _UsageError(f"cannot read {e.filename}: {e.strerror}") from None


# A base model seldom ends a completion by itself: without --max-tokens, run stops it here.
COMPLETION_MAX_TOKENS = 128


def _complete(llm: Llama, prompt: str, args: argparse.Namespace) -> int:
    """The prompt's continuation, as llama-completion gives a base model (the prompt is not repeated)."""
    sampling = {"max_tokens": COMPLETION_MAX_TOKENS, **_sampling(args)}
    if args.json:
        print(json.dumps(llm.complete(prompt, **sampling), indent=2, ensure_ascii=False))
        return 0
    return _stream_out(llm.complete(prompt, stream=True, **sampling), lambda choice: choice["text"])


def _stream_out(stream: object, text_of: Callable[[dict[str, Any]], str | None]) -> int:
    """Print a stream's text as it comes, then a newline; Ctrl-C stops it (exit status 130)."""
    from .llama import Stream

    assert isinstance(stream, Stream)
    try:
        for chunk in stream:
            text = text_of(chunk["choices"][0]) if chunk["choices"] else None
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
        print()
        return 130
    finally:
        stream.close()
    print()
    return 0


def _lacks_template(args: argparse.Namespace, llm: Llama) -> bool:
    """No --chat-template and none in the file: llama.cpp falls back to ChatML, which a base model never learnt."""
    return args.chat_template is None and all(llm.model.get_chat_template(n) is None for n in (None, "tool_use"))


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


# --- chat ----------------------------------------------------------------------------------------

_CHAT_HELP = (
    "/reset forgets the conversation, /system TEXT sets the system message, /image PATH and /audio PATH go with "
    "the next message (with --mmproj), /exit quits; Ctrl-C stops a reply"
)


def _chat(args: argparse.Namespace) -> int:
    from .session import ChatSession

    _text_output()
    interactive = sys.stdin.isatty()
    with _load(args, args.model) as llm:
        if _lacks_template(args, llm):
            _note(
                f"{llm.model_name} has no chat template (a base model): chatting in ChatML, which it never learnt, "
                "so replies may be empty or echo you; give one with --chat-template, or complete text with pyllama run"
            )
        session = ChatSession(llm, system=args.system, truncate=True, **_sampling(args))
        pending: list[dict[str, Any]] = []  # media for the next message
        if interactive:
            print(f"{llm.model_name}: {_CHAT_HELP}", file=sys.stderr)
        while True:
            try:
                if interactive:
                    line = input(">>> ")
                else:
                    line = sys.stdin.readline()
                    if not line:  # end of input (a blank line reads as "\n")
                        return 0
            except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt
                if interactive:
                    print()
                return 0
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                command, _, rest = text.partition(" ")
                if command in ("/exit", "/quit"):
                    return 0
                if command == "/reset":
                    session.reset()
                    print("(the conversation is forgotten)", file=sys.stderr)
                elif command == "/system":
                    session.system = rest.strip() or None
                    session.reset()
                    print("(new system message; the conversation is forgotten)", file=sys.stderr)
                elif command in ("/image", "/audio") and rest.strip():
                    from .media import file_part

                    try:
                        pending.append(file_part(rest.strip(), command[1:]))
                        print(f"({command[1:]} {rest.strip()} goes with the next message)", file=sys.stderr)
                    except OSError as e:
                        print(f"pyllama: cannot read {rest.strip()}: {e.strerror}", file=sys.stderr)
                else:
                    print(_CHAT_HELP, file=sys.stderr)
                continue
            content: str | list[dict[str, Any]] = [*pending, {"type": "text", "text": text}] if pending else text
            pending = []
            _reply(session.stream(content))


def _reply(pieces: Iterator[str]) -> None:
    """Print a streamed reply; Ctrl-C stops it (what was said so far stays in the history)."""
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        print("\n(stopped)", file=sys.stderr)
    except InvalidRequestError as e:  # the conversation no longer fits, say: the turn fails, the chat goes on
        print(f"pyllama: {e}", file=sys.stderr)
    finally:
        pieces.close()  # type: ignore[attr-defined]
    print()


# --- serve ---------------------------------------------------------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="path of a GGUF file (default: the demo model; none with --models-dir or --config)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument(
        "--parallel", type=int, default=1, metavar="N", help="requests generated at once (n_parallel, default 1)"
    )
    _add_model_options(parser)
    parser.add_argument(
        "--api-key", action="append", metavar="KEY", help="require 'Authorization: Bearer KEY' (repeatable)"
    )
    parser.add_argument("--alias", metavar="NAME", help="the model id clients see (default: the file's stem)")
    parser.add_argument(
        "--max-queue", type=int, default=64, metavar="N", help="requests that may wait for a slot (default 64)"
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=8 * 1024 * 1024,
        metavar="N",
        help="largest request body accepted (default 8 MiB)",
    )
    parser.add_argument(
        "--prepare-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a request may take to prepare (template, schemas, grammar) before a 400 (default 10)",
    )
    parser.add_argument(
        "--cache-ram",
        type=int,
        default=8192,
        metavar="MIB",
        help="RAM for the states of prompt prefixes the slots give up, as llama-server's (default 8192; 0: off)",
    )
    parser.add_argument(
        "--slot-save-path",
        metavar="DIR",
        help="a directory for POST /slots/{id}?action=save|restore (default: those actions are off)",
    )
    parser.add_argument(
        "--allow-media-urls",
        action="store_true",
        help="fetch http(s) URLs of images and audio in messages (default: data: URIs only)",
    )
    parser.add_argument(
        "--max-stored-responses",
        type=int,
        default=1024,
        metavar="N",
        help="responses of /v1/responses kept for previous_response_id, least recently used dropped (default 1024)",
    )
    parser.add_argument(
        "--metrics", action="store_true", help="Prometheus metrics at GET /metrics (pip install 'pyllama[metrics]')"
    )
    parser.add_argument(
        "--reranking",
        "--rerank",
        action="store_true",
        help="score pairs with the model's rank pooling (POST /v1/rerank) even where the file does not declare it",
    )
    parser.add_argument(
        "--spm-infill", action="store_true", help="/infill puts the suffix before the prefix (some models want it)"
    )
    parser.add_argument("--log-level", default="info", metavar="LEVEL", help="uvicorn's log level (default info)")
    parser.add_argument(
        "--models-dir",
        metavar="DIR",
        help="serve every model of DIR (NAME.gguf, or NAME/ with its projector), each loaded on first use",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="serve the models a TOML file lists, each with its own options (see docs/server.md)",
    )
    parser.add_argument(
        "--models-max",
        type=int,
        default=None,
        metavar="N",
        help="with several models: the most loaded at once, the least recently used unloaded first (default 4; "
        "0: no limit)",
    )
    parser.add_argument(
        "--no-models-autoload",
        dest="models_autoload",
        action="store_false",
        help="with several models: a request for a model that is not loaded is refused (POST /models/load loads it)",
    )


def _check_serve_numbers(args: argparse.Namespace, where: str = "") -> None:
    if (
        args.parallel < 1
        or args.max_queue < 0
        or args.max_request_bytes < 1
        or not args.prepare_timeout > 0
        or args.cache_ram < 0
        or args.max_stored_responses < 0
    ):
        raise _UsageError(
            f"{where}--parallel and --max-request-bytes must be >= 1, --max-queue, --cache-ram and "
            "--max-stored-responses >= 0, --prepare-timeout > 0"
        )


def _serve_extra(args: argparse.Namespace) -> dict[str, Any]:
    """The Llama keywords of serve's own options of a model."""
    extra: dict[str, Any] = {"pooling_type": "rank", "embedding": True} if args.reranking else {}
    return {"n_parallel": args.parallel, "cache_ram": args.cache_ram << 20, **extra}


def _serve(args: argparse.Namespace) -> int:
    try:
        from .server import serve
    except ModuleNotFoundError as e:
        if e.name not in ("fastapi", "uvicorn", "starlette"):
            raise
        print(f"pyllama: the server needs {e.name}: pip install 'pyllama[server]'", file=sys.stderr)
        return 1
    if args.metrics:
        try:
            import prometheus_client  # noqa: F401
        except ModuleNotFoundError:
            print("pyllama: --metrics needs prometheus-client: pip install 'pyllama[metrics]'", file=sys.stderr)
            return 1
    _check_serve_numbers(args)
    if args.models_dir is not None or args.config is not None:
        return _serve_models(args)
    if args.models_max is not None or not args.models_autoload:
        raise _UsageError("--models-max and --no-models-autoload go with several models: --models-dir or --config")
    with _load(args, args.model, **_serve_extra(args)) as llm:
        try:
            serve(
                llm,
                host=args.host,
                port=args.port,
                api_key=args.api_key,
                alias=args.alias,
                max_queue=args.max_queue,
                max_request_bytes=args.max_request_bytes,
                prepare_timeout=args.prepare_timeout,
                slot_save_path=args.slot_save_path,
                allow_media_urls=args.allow_media_urls,
                max_stored_responses=args.max_stored_responses,
                metrics=args.metrics,
                spm_infill=args.spm_infill,
                log_level=args.log_level,
            )
        except KeyboardInterrupt:  # uvicorn shut down gracefully on Ctrl-C, then re-raised it
            pass
    return 0


# --- serve, several models ------------------------------------------------------------------------

# serve's options that a model of --models-dir or --config may set for itself (the others are the server's)
SERVE_MODEL_OPTIONS = ("parallel", "cache_ram", "reranking", "spm_infill")
# options that name files: relative paths in a config file are relative to the file's directory
FILE_OPTIONS = ("mmproj", "draft_model", "lora", "control_vector")
SCALED_FILE_OPTIONS = ("lora_scaled", "control_vector_scaled")


def _serve_models(args: argparse.Namespace) -> int:
    from .server import DEFAULT_MODELS_MAX, serve_models

    try:
        from .server import config  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "tomli":
            raise
        print("pyllama: --config needs tomli on Python 3.10: pip install 'pyllama[server]'", file=sys.stderr)
        return 1
    if args.model is not None:
        raise _UsageError("give a MODEL, or --models-dir / --config for several: not both")
    if args.alias is not None:
        raise _UsageError("--alias names the one MODEL; with several, each model's id is its name (aliases: --config)")
    models_max = DEFAULT_MODELS_MAX if args.models_max is None else args.models_max
    if models_max < 0:
        raise _UsageError("--models-max must be >= 0 (0: no limit)")
    specs = _model_specs(args)
    try:
        serve_models(
            specs,
            host=args.host,
            port=args.port,
            models_max=models_max,
            autoload=args.models_autoload,
            api_key=args.api_key,
            max_queue=args.max_queue,
            max_request_bytes=args.max_request_bytes,
            prepare_timeout=args.prepare_timeout,
            slot_save_path=args.slot_save_path,
            allow_media_urls=args.allow_media_urls,
            max_stored_responses=args.max_stored_responses,
            metrics=args.metrics,
            log_level=args.log_level,
        )
    except KeyboardInterrupt:
        pass
    return 0


class _OptionsParser(argparse.ArgumentParser):
    """serve's parser for the options of one model in a config file: errors are raised, not printed."""

    def error(self, message: str) -> Any:
        raise _UsageError(message)


def _model_option_actions() -> dict[str, argparse.Action]:
    """The argparse actions of the options a model may set, by their dest."""
    parser = _OptionsParser(add_help=False)
    _add_model_options(parser)
    names = {a.dest for a in parser._actions} | set(SERVE_MODEL_OPTIONS)
    parser = _OptionsParser(prog="pyllama serve", add_help=False)
    add_serve_arguments(parser)
    return {a.dest: a for a in parser._actions if a.dest in names}


def _rebased(dest: str, value: Any, base: Path) -> Any:
    """A file option's value with its relative paths made relative to ``base``."""

    def rebase(path: str) -> str:
        return os.path.normpath(base / Path(path).expanduser())

    def each(item: Any, scaled: bool) -> Any:
        if not isinstance(item, str):
            return item  # its type is refused later
        parts = []
        for part in item.split(","):
            if scaled:
                path, sep, scale = part.rpartition(":")
                parts.append(rebase(path) + sep + scale if sep and path else part)
            else:
                parts.append(rebase(part) if part else part)
        return ",".join(parts)

    if dest == "chat_template":
        if isinstance(value, str) and "{" not in value and (base / Path(value).expanduser()).is_file():
            return os.path.normpath(base / Path(value).expanduser())
        return value
    if dest in FILE_OPTIONS or dest in SCALED_FILE_OPTIONS:
        scaled = dest in SCALED_FILE_OPTIONS
        return [each(v, scaled) for v in value] if isinstance(value, list) else each(value, scaled)
    return value


def _apply_options(
    args: argparse.Namespace, options: dict[str, Any], where: str, actions: dict[str, argparse.Action], base: Path
) -> None:
    """Set a config table's options on ``args`` as serve's command line would (the same checks)."""
    parser = _OptionsParser(prog=where, add_help=False)
    add_serve_arguments(parser)
    for key, raw in options.items():
        action = actions.get(key)
        if action is None:
            raise _UsageError(f"{where}: unknown option {key!r} (serve's model options, without dashes)")
        value = _rebased(key, raw, base)
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise _UsageError(f"{where}: {key} must be true or false")
            setattr(args, key, value if action.const is True else not value)
            continue
        repeated = isinstance(action, argparse._AppendAction)
        items = value if isinstance(value, list) and (repeated or action.nargs == 2) else [value]
        if any(isinstance(v, (bool, dict, list)) or v is None for v in items):
            kind = "a list of two values" if action.nargs == 2 else "a string or a number"
            raise _UsageError(f"{where}: {key} takes {kind}, not {raw!r}")
        if action.nargs == 2:
            if len(items) != 2:
                raise _UsageError(f"{where}: {key} takes a list of two values, not {raw!r}")
            tokens = [flag, *(str(v) for v in items)]
        else:
            tokens = [f"{flag}={v}" for v in items]
        setattr(args, key, None)  # the file's value replaces the command line's
        try:
            parser.parse_args(tokens, namespace=args)
        except _UsageError as e:
            raise _UsageError(f"{where}: {e}") from None


def _model_specs(args: argparse.Namespace) -> list[ModelSpec]:
    """The models of --models-dir and --config, each with its Llama keywords: the command line's
    model options, under the config's [defaults], under a model's own table."""
    import copy

    from .server import ModelSpec
    from .server.config import ConfigModel, read_config, scan_models_dir

    found = {m.id: m for m in scan_models_dir(args.models_dir)} if args.models_dir is not None else {}
    config = read_config(args.config) if args.config is not None else None
    tables: dict[str, ConfigModel] = {m.id: m for m in config.models} if config is not None else {}
    ids = list(found) + [i for i in tables if i not in found]
    if not ids:
        raise _UsageError(f"no model in {args.models_dir}: it holds no .gguf file (NAME.gguf or NAME/model.gguf)")
    actions = _model_option_actions()
    specs = []
    for model_id in ids:
        ns = copy.copy(args)
        load = False
        if config is not None:
            _apply_options(ns, config.defaults, f"{args.config}: [defaults]", actions, config.base)
            load = config.load_on_startup
        where = f"{args.models_dir}: {model_id}"
        dir_model = found.get(model_id)
        path = dir_model.path if dir_model is not None else None
        if dir_model is not None and dir_model.mmproj is not None:
            ns.mmproj = str(dir_model.mmproj)
        table = tables.get(model_id)
        aliases: tuple[str, ...] = ()
        if table is not None:
            assert config is not None
            where = f"{args.config}: [models.{model_id}]"
            _apply_options(ns, table.options, where, actions, config.base)
            path = table.path or path
            aliases = table.aliases
            load = load if table.load_on_startup is None else table.load_on_startup
        if path is None:
            raise _UsageError(f"{where}: no path, and no model of --models-dir has this id")
        if not path.is_file():
            raise _UsageError(f"{where}: model file not found: '{path}'")
        _check_serve_numbers(ns, f"{where}: ")
        specs.append(
            ModelSpec(
                model_id,
                path,
                aliases=aliases,
                options=_llama_options(ns, **_serve_extra(ns)),
                spm_infill=ns.spm_infill,
                load_on_startup=load,
                source="config" if table is not None and table.path is not None else "models_dir",
            )
        )
    return specs


# --- rpc-server ------------------------------------------------------------------------------------


def _rpc_server(args: argparse.Namespace) -> int:
    import ipaddress
    import signal
    import socket

    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(
            f"pyllama: WARNING: the RPC server listens on {args.host}, beyond this machine. llama.cpp's RPC protocol "
            "has no authentication and no encryption: whoever reaches the port can run computations and read what "
            "the clients send. Never expose it to an open network.",
            file=sys.stderr,
        )
    # a port that cannot be bound is said here: llama.cpp's server only prints it and returns
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as e:
            print(f"pyllama: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
            return 1
    devices = [d for v in args.device or [] for d in v.split(",") if d]
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends the worker, as it ends llama.cpp's
    _core.rpc_serve(args.host, args.port, devices=devices, n_threads=args.threads or 0, cache=args.cache)
    return 1  # rpc_serve returns only by raising


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyllama", description="llama.cpp from Python.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="show a model's metadata (default: Gemma 3 270M)")
    info.add_argument("model", nargs="?", help="path of a GGUF file (default: the demo model)")
    info.add_argument("--json", action="store_true", help="print JSON, with all GGUF metadata")
    info.add_argument("--prompt", help="also show how this text tokenizes")
    info.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload (default 0)")
    info.add_argument("--mmproj", metavar="FILE", help="also say what this projector file takes (images, audio)")
    info.set_defaults(func=_info)

    system = sub.add_parser("system", help="show the build's CPU features and devices")
    system.set_defaults(func=_system)

    rpc = sub.add_parser(
        "rpc-server",
        help="serve this machine's devices to llama.cpp RPC clients (--rpc)",
        description="llama.cpp's RPC worker for this machine's devices: clients (pyllama --rpc, Llama(rpc_servers=), "
        "llama.cpp's --rpc) put layers on it. The protocol has no authentication: keep it on loopback (the "
        "default) or a trusted network.",
    )
    rpc.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    rpc.add_argument("--port", type=int, default=50052, help="port to listen on (default 50052)")
    rpc.add_argument(
        "--device",
        action="append",
        metavar="NAMES",
        help="devices to serve, comma-separated (pyllama system lists them)",
    )
    rpc.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: half the cores)")
    rpc.add_argument("--cache", action="store_true", help="keep tensors clients send in llama.cpp's cache directory")
    rpc.set_defaults(func=_rpc_server)

    run = sub.add_parser(
        "run",
        help="one chat reply to PROMPT (or its completion, on a base model), streamed to stdout",
        usage="pyllama run [-h] [options] [MODEL] PROMPT",
        description="One chat reply, streamed. One argument is the PROMPT (for the demo model); "
        "two are MODEL PROMPT. A PROMPT of '-' is read from stdin. A model without a chat template "
        "(a base model, such as the demo model) and no --chat-template completes the PROMPT as text "
        f"instead: its continuation is printed (at most {COMPLETION_MAX_TOKENS} tokens without --max-tokens).",
    )
    run.add_argument("words", nargs="+", metavar="[MODEL] PROMPT", help="a GGUF file (optional) and the prompt")
    run.add_argument(
        "--json", action="store_true", help="print the whole ChatCompletion (or Completion) as JSON, when done"
    )
    run.add_argument("--image", action="append", metavar="PATH", help="an image for the prompt (with --mmproj)")
    run.add_argument("--audio", action="append", metavar="PATH", help="audio for the prompt (with --mmproj)")
    _add_sampling_options(run)
    _add_model_options(run)
    run.set_defaults(func=_run, parser=run)

    chat = sub.add_parser(
        "chat",
        help="an interactive chat (/reset, /system TEXT, /exit)",
        description=f"An interactive chat: one line is one message. {_CHAT_HELP}.",
    )
    chat.add_argument("model", nargs="?", metavar="MODEL", help="path of a GGUF file (default: the demo model)")
    _add_sampling_options(chat)
    _add_model_options(chat)
    chat.set_defaults(func=_chat)

    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server",
        description="An OpenAI-compatible HTTP server (needs pip install 'pyllama[server]').",
    )
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve, parser=serve)
    return parser


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except _UsageError as e:
        command: argparse.ArgumentParser = getattr(args, "parser", parser)
        command.error(str(e))
    except (DefaultModelMissing, FileNotFoundError, ValueError, _core.LlamaError) as e:
        print(f"pyllama: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return _dispatch(parser, parser.parse_args(argv))


def serve_main(argv: Sequence[str] | None = None, prog: str = "pyllama serve") -> int:
    """``python -m pyllama.server``: the ``serve`` command on its own."""
    parser = argparse.ArgumentParser(prog=prog, description="An OpenAI-compatible HTTP server over a GGUF model.")
    add_serve_arguments(parser)
    parser.set_defaults(func=_serve)
    return _dispatch(parser, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
