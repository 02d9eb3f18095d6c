"""Prometheus metrics of one served engine (one arm), with vLLM's names under a `specray:` prefix.

Owns a private `CollectorRegistry` per `ServerMetrics`, so several arms (engines) can live in one
process and be scraped separately. Every series carries the labels `model_name` and `arm`.

Data flow:
- request latencies are observed by the serving layer when a request finishes
  (`observe_finished`): TTFT, TPOT (per output token, (E2E - TTFT) / (n_out - 1)) and E2E;
- engine state is pulled at scrape time (`refresh`): running and waiting requests and KV pages in
  use from the engine, and the spec-decode counters as deltas of the engine's cumulative
  `SpeculativeDecoder.stats` (a replaced decoder, e.g. after `set_speculative_config`, restarts its
  counts from zero; the Prometheus counters stay monotonic).

Derived metrics, in PromQL (as vLLM documents them):
- acceptance rate      = rate(specray:spec_decode_num_accepted_tokens_total[1m])
                         / rate(specray:spec_decode_num_draft_tokens_total[1m])
- mean acceptance len  = 1 + rate(specray:spec_decode_num_accepted_tokens_total[1m])
                         / rate(specray:spec_decode_num_drafts_total[1m])
- acceptance at pos k  = rate(specray:spec_decode_num_accepted_tokens_per_pos_total{position="k"}[1m])
                         / rate(specray:spec_decode_num_drafts_total[1m])
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "specray:"
LABELS = ("model_name", "arm")

# seconds; dense at the low end where CPU/GPU decode steps live
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0)


def _value(x: Any) -> int:
    """Engine accessors may be properties or methods (LLMEngine has both kinds)."""
    return int(x() if callable(x) else x)


class ServerMetrics:
    def __init__(self, engine: Any, model_name: str, arm: str):
        """`engine`: an `LLMEngine`-like object (`spec`, `num_running`, `num_waiting`, `pages_in_use`)."""
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"model_name": model_name, "arm": arm}
        r = self.registry

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, LABELS + extra, registry=r)

        self.num_drafts = counter("spec_decode_num_drafts", "Number of spec-decode drafts (draft trees verified).")
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Number of draft tokens proposed.")
        self.num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Number of draft tokens accepted.")
        self.accepted_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos", "Accepted draft tokens at each draft depth.", ("position",)
        )
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token (server side).",
                              LABELS, buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                              "Time per output token after the first: (E2E - TTFT) / (output tokens - 1).",
                              LABELS, buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end request latency (server side).",
                             LABELS, buckets=_E2E_BUCKETS, registry=r)
        self.running = Gauge(PREFIX + "num_requests_running", "Requests in the running batch.", LABELS, registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests waiting to be scheduled.", LABELS,
                             registry=r)
        self.pages = Gauge(PREFIX + "kv_cache_pages_in_use", "KV-cache pages held by live requests.", LABELS,
                           registry=r)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens of finished requests.")
        self.request_success = counter("request_success", "Finished requests by finish reason.", ("finished_reason",))
        # materialise the label sets so every series exists (at 0) from the first scrape
        for c in (self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens, self.prompt_tokens,
                  self.generation_tokens, self.ttft, self.tpot, self.e2e):
            c.labels(**self.labels)
        self._stats_obj: object | None = None
        self._seen = (0, 0, 0)  # drafts, draft tokens, accepted tokens already exported
        self._seen_pos: list[int] = []

    def observe_finished(self, ttft_s: float | None, e2e_s: float, num_prompt: int, num_output: int,
                         finish_reason: str | None) -> None:
        lab = self.labels
        if ttft_s is not None:
            self.ttft.labels(**lab).observe(ttft_s)
            if num_output > 1:
                self.tpot.labels(**lab).observe((e2e_s - ttft_s) / (num_output - 1))
        self.e2e.labels(**lab).observe(e2e_s)
        self.prompt_tokens.labels(**lab).inc(num_prompt)
        self.generation_tokens.labels(**lab).inc(num_output)
        self.request_success.labels(**lab, finished_reason=finish_reason or "unknown").inc()

    def observe_aborted(self) -> None:
        """A started request that did not finish (client disconnect, cancellation, engine error)."""
        self.request_success.labels(**self.labels, finished_reason="abort").inc()

    def refresh(self) -> None:
        """Pull engine state into the gauges and spec-decode counters (call before exposition)."""
        eng, lab = self.engine, self.labels
        self.running.labels(**lab).set(_value(eng.num_running))
        self.waiting.labels(**lab).set(_value(eng.num_waiting))
        self.pages.labels(**lab).set(_value(eng.pages_in_use))
        spec = getattr(eng, "spec", None)
        stats = getattr(spec, "stats", None)
        if stats is None:
            return
        if stats is not self._stats_obj:  # a new decoder counts from zero
            self._stats_obj, self._seen, self._seen_pos = stats, (0, 0, 0), []
        now = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)
        for counter, new, old in zip((self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens), now,
                                     self._seen, strict=True):
            if new > old:
                counter.labels(**lab).inc(new - old)
        self._seen = now
        per_pos = list(stats.accepted_per_pos)
        for pos, n in enumerate(per_pos):
            old = self._seen_pos[pos] if pos < len(self._seen_pos) else 0
            child = self.accepted_per_pos.labels(**lab, position=str(pos))
            if n > old:
                child.inc(n - old)
        self._seen_pos = per_pos

    def exposition(self) -> tuple[bytes, str]:
        """(Prometheus text format, its content type)."""
        self.refresh()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
