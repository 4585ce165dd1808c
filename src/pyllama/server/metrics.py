"""Prometheus metrics of the server (``--metrics``, ``create_app(metrics=True)``): ``GET /metrics``.

Written with ``prometheus-client`` (the ``metrics`` extra), one ``CollectorRegistry`` per app, so that
several apps in one process keep their counts apart. llama-server's names (``llamacpp:...``) are used
where pyllama measures the same thing; the others are ``pyllama_...``:

- requests answered, by endpoint (the route's path) and status, and their durations;
- the tokens of every generation when it ends (chat, completions, infill, Responses, Messages): prompt
  tokens evaluated and taken from the prefix cache, generated tokens, speculative drafts;
- the slots: requests holding one, requests waiting for one, the tokens each holds in the KV memory,
  the bytes of the host cache of prompt prefixes;
- prompt and generation time and throughput from llama.cpp's own counters of the context
  (``llama_perf_context``): decode calls of one token count as generation, larger ones as prompt
  processing (so with several slots generating at once, their shared steps count as prompt
  processing). The throughput gauges are averaged over the time between two scrapes, as llama-server's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .app import _Server

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
UNMATCHED = "unmatched"  # the endpoint label of a path no route serves
NO_ANSWER = 499  # the status label of a request whose client went away before any answer


class _Perf:
    """llama.cpp's counters of the generation context, as deltas: totals that only grow, and the
    rates over the window since the last read."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.lock = threading.Lock()
        self.last = self._read()
        self.prompt_s = 0.0
        self.eval_s = 0.0
        self.prompt_rate = 0.0
        self.eval_rate = 0.0

    def _read(self) -> tuple[float, int, float, int]:
        p = self.server.llm.context.perf()
        t_p, t_e = float(p["t_p_eval_ms"]), float(p["t_eval_ms"])
        # llama.cpp reports a count of at least 1; no time means nothing was evaluated
        n_p = int(p["n_p_eval"]) if t_p > 0 else 0
        n_e = int(p["n_eval"]) if t_e > 0 else 0
        return t_p, n_p, t_e, n_e

    def update(self) -> None:
        with self.lock:
            now = self._read()
            t_p, n_p, t_e, n_e = now
            t_p0, n_p0, t_e0, n_e0 = self.last
            if t_p < t_p0 or n_p < n_p0 or t_e < t_e0 or n_e < n_e0:  # the counters were reset
                t_p0 = n_p0 = t_e0 = n_e0 = 0
            self.prompt_s += (t_p - t_p0) / 1e3
            self.eval_s += (t_e - t_e0) / 1e3
            self.prompt_rate = (n_p - n_p0) / ((t_p - t_p0) / 1e3) if t_p > t_p0 else 0.0
            self.eval_rate = (n_e - n_e0) / ((t_e - t_e0) / 1e3) if t_e > t_e0 else 0.0
            self.last = now


class _State(Collector):
    """A collector of what is read at scrape time: the slots, the KV memory, llama.cpp's timings."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.perf = _Perf(server)
        # (holding a slot, waiting for one), read on the event loop that owns the queue (see render)
        self.slots = (0, 0)

    def collect(self) -> Iterator[Metric]:
        server = self.server
        engine = server.llm._engine
        processing, deferred = self.slots
        self.perf.update()
        yield GaugeMetricFamily("llamacpp:requests_processing", "Number of requests holding a slot", value=processing)
        yield GaugeMetricFamily(
            "llamacpp:requests_deferred", "Number of requests waiting for a free slot", value=deferred
        )
        yield GaugeMetricFamily("pyllama_slots", "Slots: requests generated at once (n_parallel)", value=server.slots.n)
        kv = GaugeMetricFamily("pyllama_kv_tokens", "Tokens a slot holds in the KV memory", labels=["slot"])
        for i in range(server.llm.n_parallel):
            kv.add_metric([str(i)], len(engine.tokens(i)))
        yield kv
        yield GaugeMetricFamily("pyllama_kv_tokens_per_slot", "Tokens one slot can hold", value=engine.n_ctx_seq)
        yield GaugeMetricFamily(
            "pyllama_host_cache_bytes",
            "Bytes of the states of prompt prefixes kept in RAM (--cache-ram)",
            value=engine.host_cache()["bytes"],
        )
        perf = self.perf
        yield CounterMetricFamily(
            "llamacpp:prompt_seconds", "Total time spent processing prompts (llama.cpp's counters)", value=perf.prompt_s
        )
        yield CounterMetricFamily(
            "llamacpp:tokens_predicted_seconds",
            "Total time spent generating tokens (llama.cpp's counters)",
            value=perf.eval_s,
        )
        yield GaugeMetricFamily(
            "llamacpp:prompt_tokens_seconds", "Average prompt throughput in tokens/s", value=perf.prompt_rate
        )
        yield GaugeMetricFamily(
            "llamacpp:predicted_tokens_seconds", "Average generation throughput in tokens/s", value=perf.eval_rate
        )


class Metrics:
    """The registry of one app and what feeds it: ``observe_usage`` for every generation that ends,
    ``middleware`` for every request."""

    def __init__(self, server: _Server, routes: list[BaseRoute]) -> None:
        self.routes = routes
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "pyllama_requests", "Requests answered, by endpoint and status", ["endpoint", "status"], registry=registry
        )
        self.duration = Histogram(
            "pyllama_request_duration_seconds",
            "Time from a request's arrival to the end of its answer",
            ["endpoint"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "llamacpp:prompt_tokens", "Number of prompt tokens processed, excluding cached tokens", registry=registry
        )
        self.cached_tokens = Counter(
            "llamacpp:prompt_tokens_cached", "Number of prompt tokens reused from the cache", registry=registry
        )
        self.predicted_tokens = Counter(
            "llamacpp:tokens_predicted", "Number of generation tokens processed", registry=registry
        )
        self.draft_tokens = Counter(
            "llamacpp:spec_decode_num_draft_tokens", "Speculative: Total draft tokens generated", registry=registry
        )
        self.accepted_tokens = Counter(
            "llamacpp:spec_decode_num_accepted_tokens",
            "Speculative: Total draft tokens accepted by the target model",
            registry=registry,
        )
        self.generations = Counter("pyllama_generations", "Generations that ended", registry=registry)
        self.n_tokens_max = Gauge(
            "llamacpp:n_tokens_max", "Largest observed sequence length (prompt + generation)", registry=registry
        )
        self._n_tokens_max = 0
        self.server = server
        self.state = _State(server)
        self.lock = threading.Lock()
        registry.register(self.state)

    def observe_usage(self, usage: dict[str, Any]) -> None:
        """Count the tokens of a generation that ended (OpenAI's usage)."""
        prompt = int(usage["prompt_tokens"])
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        completion = int(usage["completion_tokens"])
        drafts = usage.get("completion_tokens_details") or {}
        accepted = int(drafts.get("accepted_prediction_tokens") or 0)
        rejected = int(drafts.get("rejected_prediction_tokens") or 0)
        self.generations.inc()
        self.prompt_tokens.inc(prompt - cached)
        self.cached_tokens.inc(cached)
        self.predicted_tokens.inc(completion)
        self.draft_tokens.inc(accepted + rejected)
        self.accepted_tokens.inc(accepted)
        if prompt + completion > self._n_tokens_max:
            self._n_tokens_max = prompt + completion
            self.n_tokens_max.set(self._n_tokens_max)

    def slot_counts(self) -> tuple[int, int]:
        """(requests holding a slot, requests waiting for one): on the event loop, which owns the queue."""
        slots = self.server.slots
        return slots.n - slots.free, slots.queued

    def render(self, slot_counts: tuple[int, int]) -> bytes:
        """The text exposition, with ``slot_counts`` read on the event loop; it reads the KV memory and
        llama.cpp's counters, which may wait for a decode step: call it off the event loop."""
        with self.lock:
            self.state.slots = slot_counts
            return generate_latest(self.registry)

    def endpoint(self, scope: Scope) -> str:
        """The path of the route that serves ``scope`` (a bounded label), or ``unmatched``."""
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return str(getattr(route, "path", UNMATCHED))
            if match == Match.PARTIAL and partial is None:  # the path, another method: a 405
                partial = str(getattr(route, "path", UNMATCHED))
        return partial or UNMATCHED

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """ASGI middleware counting every HTTP request by endpoint and status (the outermost one, so
        that the guard's 401 and 413 are counted too)."""

        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            endpoint = self.endpoint(scope)
            status = NO_ANSWER
            start = time.perf_counter()

            async def sending(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            try:
                await app(scope, receive, sending)
            finally:
                self.requests.labels(endpoint, str(status)).inc()
                self.duration.labels(endpoint).observe(time.perf_counter() - start)

        return counted
