"""With a GPU build on a machine with a GPU (benchmarks/gpu.sh runs these there): layers offloaded give
the greedy tokens of the CPU run up to the first near-tie (top-2 logprob margin under 1e-3, taken from
the CPU run), one sequence and eight at once through the generation core. Skipped without a GPU."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import pytest

import pyllama

from tiny_models import write_tiny_llama

pytestmark = pytest.mark.skipif(
    not pyllama.supports_gpu_offload() or not any(d["type"] in ("gpu", "igpu") for d in pyllama.devices()),
    reason="no GPU: a GPU build and a GPU are needed",
)

NEAR_TIE = 1e-3


def greedy(llm: pyllama.Llama, prompt: str, n: int) -> tuple[list[str], list[float]]:
    """The greedy tokens of a completion and the top-2 logprob margin at each."""
    out = llm.complete(prompt, max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=2)
    lp = out["choices"][0]["logprobs"]
    margins = []
    for top in lp["top_logprobs"]:
        best = sorted(top.values(), reverse=True)
        margins.append(best[0] - best[1] if len(best) > 1 else float("inf"))
    return lp["tokens"], margins


def agree(got: list[str], want: list[str], margins: list[float]) -> bool:
    for g, w, margin in zip(got, want, margins, strict=True):
        if margin < NEAR_TIE:
            return True
        if g != w:
            return False
    return True


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("gpu") / "tiny.gguf", n_embd=256, n_layer=4, n_ff=512)


@pytest.mark.real_model
def test_gemma_offloaded_gives_the_cpu_tokens(gemma_path: Path) -> None:
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    with pyllama.Llama(gemma_path, n_gpu_layers=0, n_ctx=512) as cpu:
        want = [greedy(cpu, p, 16) for p in prompts]
    with pyllama.Llama(gemma_path, n_gpu_layers=-1, n_ctx=512) as gpu:
        for p, (tokens, margins) in zip(prompts, want, strict=True):
            got, _ = greedy(gpu, p, 16)
            assert agree(got, tokens, margins), (p, got, tokens)


def test_eight_sequences_on_the_gpu_equal_their_cpu_runs(f32_model: Path) -> None:
    prompts = [f"Story {i}: once upon a time there was" for i in range(8)]
    with pyllama.Llama(f32_model, n_gpu_layers=0, n_ctx=512) as cpu:
        want = [greedy(cpu, p, 12) for p in prompts]
    with (
        pyllama.Llama(f32_model, n_gpu_layers=-1, n_ctx=8 * 512, n_parallel=8) as gpu,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        got: list[Any] = list(pool.map(lambda p: greedy(gpu, p, 12)[0], prompts))
    for g, (tokens, margins) in zip(got, want, strict=True):
        assert agree(g, tokens, margins)
