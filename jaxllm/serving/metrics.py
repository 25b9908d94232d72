"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Request, token and latency metrics, plus engine gauges refreshed at each scrape."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("jaxllm_requests", "Finished HTTP requests by status code", ["status"], registry=r)
        self.prompt_tokens = Counter("jaxllm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("jaxllm_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "jaxllm_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "jaxllm_inter_token_latency_seconds", "Time between tokens", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("jaxllm_queue_depth", "Sequences waiting for a slot", registry=r)
        self.running = Gauge("jaxllm_running_sequences", "Sequences holding a slot", registry=r)
        self.kv_usage = Gauge("jaxllm_kv_cache_usage_ratio", "Fraction of KV cache pages in use", registry=r)
        self.pages_used = Gauge("jaxllm_kv_cache_pages_used", "KV cache pages held by sequences", registry=r)
        self.pages_free = Gauge("jaxllm_kv_cache_pages_free", "KV cache pages free (cached or not)", registry=r)
        self.pages_cached = Gauge("jaxllm_kv_cache_pages_cached", "KV cache pages findable by prefix", registry=r)
        self.page_size = Gauge("jaxllm_kv_cache_page_size_tokens", "Tokens per KV cache page", registry=r)
        self.preemptions = Gauge("jaxllm_preemptions", "Sequences preempted for lack of KV pages so far", registry=r)
        self.prefix_queries = Gauge("jaxllm_prefix_cache_queries", "Prompt pages looked up so far", registry=r)
        self.prefix_hits = Gauge("jaxllm_prefix_cache_hits", "Prompt pages found in the cache so far", registry=r)
        self.warmup_seconds = Gauge("jaxllm_warmup_seconds", "Seconds spent compiling steps before serving", registry=r)
        self.compiled_shapes = Gauge("jaxllm_warmup_compiled_shapes", "Step shapes compiled before serving", registry=r)

    def render(self, stats) -> bytes:
        self.queue_depth.set(stats.waiting)
        self.running.set(stats.running)
        total = stats.kv_pages_used + stats.kv_pages_free
        self.kv_usage.set(stats.kv_pages_used / total if total else 0.0)
        self.pages_used.set(stats.kv_pages_used)
        self.pages_free.set(stats.kv_pages_free)
        self.pages_cached.set(stats.kv_pages_cached)
        self.page_size.set(stats.kv_page_size)
        self.preemptions.set(stats.preemptions)
        self.prefix_queries.set(stats.prefix_cache_queries)
        self.prefix_hits.set(stats.prefix_cache_hits)
        return generate_latest(self.registry)
