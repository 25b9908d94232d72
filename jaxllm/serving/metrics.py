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
        self.kv_usage = Gauge("jaxllm_kv_cache_usage_ratio", "Fraction of KV cache token capacity in use", registry=r)

    def render(self, stats) -> bytes:
        self.queue_depth.set(stats.waiting)
        self.running.set(stats.running)
        self.kv_usage.set(stats.kv_used_tokens / stats.kv_capacity_tokens if stats.kv_capacity_tokens else 0.0)
        return generate_latest(self.registry)
