"""A portable build (PYLLAMA_PORTABLE) loads the CPU backend variant that suits the CPU it runs on
(scripts/check_portable.sh runs these under qemu-x86_64 as older CPUs, with PYLLAMA_EXPECT_CPU_VARIANT
set to the variant that CPU must get), and decodes with it: greedy tokens equal numpy's argmax over
the logits of the same run. Skipped in a default build."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

import pyllama
from pyllama import _core

pytestmark = pytest.mark.skipif(not _core.PORTABLE, reason="a default build: one module, no variants")


def loaded_variant() -> str:
    """The CPU variant library mapped into this process."""
    maps = Path("/proc/self/maps").read_text()
    found = set(re.findall(r"libggml-cpu-([\w.]+)\.so", maps))
    assert len(found) == 1, found
    return found.pop()


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_the_variant_that_suits_this_cpu_is_loaded() -> None:
    variant = loaded_variant()
    assert variant != "sapphirerapids"
    expected = os.environ.get("PYLLAMA_EXPECT_CPU_VARIANT")
    if expected:  # an emulated CPU (qemu-user shows the host's /proc/cpuinfo)
        assert variant == expected
        return
    flags = cpu_flags()
    info = pyllama.system_info()
    # the variant uses what the CPU has: AVX2 where it has AVX2, no AVX-512 where it has none
    assert ("AVX2 = 1" in info) == ("avx2" in flags)
    if "avx512f" not in flags:
        assert "AVX512 = 1" not in info


def test_greedy_tokens_are_numpy_argmax(tiny_model_path: Path) -> None:
    with pyllama.Model(str(tiny_model_path)) as model:
        prompt = list(model.tokenize("Once upon a time"))
        with pyllama.Context(model, n_ctx=128, n_threads=1) as ctx:
            ctx.decode(pyllama.Batch.from_tokens(prompt))
            want: list[int] = []
            for _ in range(8):
                want.append(int(np.argmax(ctx.logits())))
                ctx.decode(pyllama.Batch.from_tokens([want[-1]], pos0=len(prompt) + len(want) - 1))
        pieces = [model.token_to_piece(t).decode("utf-8", "replace") for t in want]
    with pyllama.Llama(tiny_model_path, n_ctx=128, n_threads=1) as llm:
        out = llm.complete(prompt, max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)
    assert out["choices"][0]["logprobs"]["tokens"] == pieces
