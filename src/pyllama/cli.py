"""The ``pyllama`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import _core
from .models import DefaultModelMissing, resolve_model_path


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
        }
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


def _system(_: argparse.Namespace) -> int:
    print(f"pyllama {_core.__version__} (llama.cpp {_core.LLAMA_CPP_COMMIT[:9]})")
    print(_core.system_info())
    for dev in _core.devices():
        print(f"device {dev['index']}: {dev['name']} ({dev['type']}) {dev['description']}")
    print(f"GPU offload: {'yes' if _core.supports_gpu_offload() else 'no'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyllama", description="llama.cpp from Python.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="show a model's metadata (default: Gemma 3 270M)")
    info.add_argument("model", nargs="?", help="path of a GGUF file (default: the demo model)")
    info.add_argument("--json", action="store_true", help="print JSON, with all GGUF metadata")
    info.add_argument("--prompt", help="also show how this text tokenizes")
    info.add_argument("--n-gpu-layers", type=int, default=0, help="layers to offload (default 0)")
    info.set_defaults(func=_info)

    system = sub.add_parser("system", help="show the build's CPU features and devices")
    system.set_defaults(func=_system)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (DefaultModelMissing, FileNotFoundError, _core.LlamaError) as e:
        print(f"pyllama: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
