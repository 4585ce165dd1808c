"""Concurrent streaming clients against an OpenAI-compatible server.

Each server runs in a process of its own (its peak RSS comes from wait4 when it exits). Every
client streams /v1/completions requests one after another; a level's aggregate throughput is all
completion tokens over the wall time, and its latency is each request's time from sending to the
last event. The prompt-heavy load (``bench_prompt``) sends rounds of concurrent streamed
/v1/chat/completions with one long system prompt to freshly started servers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

now = time.perf_counter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    peak_rss_mib: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} did not come up in {timeout} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.peak_rss_mib = maxrss_mib(usage.ru_maxrss)
                self.proc.returncode = status
                break
            time.sleep(0.1)
        else:
            self.proc.kill()
            _, _, usage = os.wait4(self.proc.pid, 0)
            self.peak_rss_mib = maxrss_mib(usage.ru_maxrss)
        self.proc = None


def maxrss_mib(ru_maxrss: int) -> float:
    """ru_maxrss is KiB on Linux and bytes on macOS."""
    return ru_maxrss / (1024 * 1024) if sys.platform == "darwin" else ru_maxrss / 1024


@dataclass
class Level:
    clients: int
    seconds: list[float] = field(default_factory=list)  # wall time of each repetition
    tokens: list[int] = field(default_factory=list)  # completion tokens of each repetition
    latency: list[float] = field(default_factory=list)  # every request's
    ttft: list[float] = field(default_factory=list)  # every request's first text


async def sse_events(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The events of one streamed POST, up to ``data: [DONE]``; RuntimeError for a status other than 200."""
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data.strip() == "[DONE]":
                return
            yield json.loads(data)


async def one_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], count: Callable[[str], int]
) -> tuple[float, float, int]:
    """Streams one completion; returns (latency, time to first text, completion tokens)."""
    t0 = now()
    first = None
    text = []
    usage = None
    async for event in sse_events(client, f"{url}/v1/completions", body):
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices") or []:
            piece = choice.get("text") or ""
            if piece:
                if first is None:
                    first = now()
                text.append(piece)
    t1 = now()
    n = usage["completion_tokens"] if usage else count("".join(text))
    return t1 - t0, (first or t1) - t0, n


async def run_level(
    url: str, clients: int, rounds: int, prompts: list[str], body: dict[str, Any], count: Callable[[str], int]
) -> tuple[float, int, list[tuple[float, float, int]]]:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker(c: int) -> list[tuple[float, float, int]]:
            got = []
            for r in range(rounds):
                prompt = prompts[(c * rounds + r) % len(prompts)]
                got.append(await one_request(client, url, {**body, "prompt": prompt}, count))
            return got

        t0 = now()
        results = await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = now() - t0
    flat = [x for per in results for x in per]
    return wall, sum(n for _, _, n in flat), flat


def bench_servers(
    servers: list[Server],
    levels: list[int],
    reps: int,
    rounds: int,
    prompts: list[str],
    body: dict[str, Any],
    count: Callable[[str], int],
    warmup_clients: int,
) -> dict[str, Any]:
    """All servers run at once (idle ones take no CPU), and the measurements alternate between
    them, level by level, so that a slow spell of the machine does not fall on one server only."""
    out: dict[str, Any] = {s.name: {"levels": {}} for s in servers}
    try:
        for server in servers:
            server.start()
            # Warm-up, not counted: every slot generates once.
            asyncio.run(run_level(server.url, warmup_clients, 1, prompts, body, count))
        for rep in range(reps):
            for n in levels:
                for server in servers:
                    wall, tokens, flat = asyncio.run(run_level(server.url, n, rounds, prompts, body, count))
                    level = out[server.name]["levels"].setdefault(str(n), Level(n).__dict__)
                    level["seconds"].append(wall)
                    level["tokens"].append(tokens)
                    level["latency"] += [lat for lat, _, _ in flat]
                    level["ttft"] += [t for _, t, _ in flat]
                    print(
                        f"[bench]   repetition {rep + 1}, {n} clients, {server.name}: {tokens / wall:.1f} tok/s",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for server in servers:
            server.stop()
            out[server.name]["peak_rss_mib"] = server.peak_rss_mib
            out[server.name]["argv"] = server.argv
    return out


# --- prompt-heavy load: concurrent chats with one long system prompt ------------------------------


async def one_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Streams one chat completion; its latency (sending to the last event), time to the first
    non-empty delta (a role-only first chunk does not count) and the server's own token counts
    (``cached_tokens``: the prompt tokens it reused, from ``usage`` or llama-server's ``timings``)."""
    t0 = now()
    first = None
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    text: list[str] = []
    async for event in sse_events(client, f"{url}/v1/chat/completions", body):
        usage = event.get("usage") or usage
        timings = event.get("timings") or timings
        for choice in event.get("choices") or []:
            delta = choice.get("delta") or {}
            if first is None and (delta.get("content") or delta.get("reasoning_content")):
                first = now()
            text.append(delta.get("content") or "")
    t1 = now()
    usage = usage or {}
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None and timings:
        cached = timings.get("cache_n")
    return {
        "latency": t1 - t0,
        "ttft": (first or t1) - t0,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "cached_tokens": cached,
        "text": "".join(text),
    }


async def chat_round(url: str, bodies: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    """Sends every body at once; the wall time from sending them to the last one finishing."""
    n = len(bodies)
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = now()
        replies = await asyncio.gather(*(one_chat(client, url, b) for b in bodies))
        wall = now() - t0
    return wall, list(replies)


async def users_round(
    url: str, bodies: list[dict[str, Any]], wave: int, interval: float
) -> tuple[float, list[dict[str, Any]]]:
    """Sends the bodies ``wave`` at a time, a wave every ``interval`` seconds (each request's time to
    first token counts from its own sending); the wall time from the first wave to the last reply."""
    n = len(bodies)
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        t0 = now()

        async def user(i: int, body: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, t0 + (i // wave) * interval - now()))
            return await one_chat(client, url, body)

        replies = await asyncio.gather(*(user(i, b) for i, b in enumerate(bodies)))
        wall = now() - t0
    return wall, list(replies)


ROUND_KEYS = ("ttft", "latency", "prompt_tokens", "completion_tokens", "cached_tokens", "text")


def record_round(phase: dict[str, Any], wall: float, replies: list[dict[str, Any]]) -> None:
    """Adds one round to a phase's record: ``wall`` gets one value per round, the per-request keys
    one list (in the order the requests were sent) per round."""
    phase.setdefault("wall", []).append(wall)
    for key in ROUND_KEYS:
        phase.setdefault(key, []).append([r.get(key) for r in replies])


async def warm_up(url: str, body: dict[str, Any]) -> None:
    """One non-streamed /v1/completions request, not measured."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        r = await client.post(f"{url}/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{url}: warm-up: HTTP {r.status_code}: {r.text[:300]!r}")


def alternate(names: list[str], rep: int) -> list[str]:
    """The servers' order in a repetition: as given in even ones, reversed in odd ones, so that
    neither always runs first (or right after the other)."""
    return list(names) if rep % 2 == 0 else list(reversed(names))


def bench_prompt(
    make_server: Callable[[str, str], Server],
    names: list[str],
    reps: int,
    chats: Callable[[int], list[dict[str, Any]]],
    single: Callable[[int], dict[str, Any]],
    warmup: dict[str, Any],
    users: Callable[[int], list[dict[str, Any]]] | None = None,
    wave: int = 4,
    interval: float = 1.0,
) -> dict[str, Any]:
    """Cold and warm rounds of concurrent chats, and one long prompt, on freshly started servers.

    Each repetition starts every server anew for each of its two measurements, so nothing it
    cached in an earlier one survives: a new process has empty KV cells and an empty prompt cache.
    Before measuring, one ``warmup`` completion runs (llama-server decodes a warm-up batch while it
    starts, pyllama does not; this evens that out): its prompt must share no first token with the
    measured ones. ``chats(rep)`` gives the concurrent round, sent twice: cold, then at once the
    identical warm round (each slot may hold its prefix); ``single(rep)`` the one long prompt. The
    servers alternate measurement by measurement (``alternate``), one up at a time. ``users(rep)``,
    when given, is a third measurement: many users arriving ``wave`` at a time, every ``interval`` s.
    """
    out: dict[str, Any] = {n: {"cold": {}, "warm": {}, "single": {}, "users": {}, "peak_rss_mib": None} for n in names}
    phases = ("chats", "single") if users is None else ("chats", "single", "users")
    for rep in range(reps):
        for phase in phases:
            for name in alternate(names, rep):
                server = make_server(name, f"{phase}-{rep + 1}")
                try:
                    server.start()
                    asyncio.run(warm_up(server.url, warmup))
                    if phase == "chats":
                        bodies = chats(rep)
                        record_round(out[name]["cold"], *asyncio.run(chat_round(server.url, bodies)))
                        record_round(out[name]["warm"], *asyncio.run(chat_round(server.url, bodies)))
                        what = f"cold {out[name]['cold']['wall'][-1]:.2f} s, warm {out[name]['warm']['wall'][-1]:.2f} s"
                    elif phase == "users":
                        assert users is not None
                        got = asyncio.run(users_round(server.url, users(rep), wave, interval))
                        record_round(out[name]["users"], *got)
                        ttft = out[name]["users"]["ttft"][-1]
                        what = f"mean TTFT {sum(ttft) / len(ttft):.2f} s, wall {out[name]['users']['wall'][-1]:.2f} s"
                    else:
                        record_round(out[name]["single"], *asyncio.run(chat_round(server.url, [single(rep)])))
                        what = f"{out[name]['single']['wall'][-1]:.2f} s"
                finally:
                    server.stop()
                rss = [x for x in (out[name]["peak_rss_mib"], server.peak_rss_mib) if x is not None]
                out[name]["peak_rss_mib"] = max(rss) if rss else None
                out[name]["argv"] = server.argv
                print(f"[bench]   repetition {rep + 1}, {phase}, {name}: {what}", file=sys.stderr, flush=True)
    return out
