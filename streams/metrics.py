"""Prometheus metrics of the stream workers and their HTTP endpoint (127.0.0.1 by default), plus key=value logs.

One registry per process; each worker calls `serve(port)` once. Port 0 or None means no endpoint.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

EVENTS_IN = Counter("domaintok_events_in_total", "Records consumed", ["stage"], registry=REGISTRY)
RECORDS_OUT = Counter("domaintok_records_out_total", "Records produced (sequences or embeddings)", ["stage"], registry=REGISTRY)
DEAD_LETTERED = Counter(
    "domaintok_dead_lettered_total", "Records sent to dead-letter", ["stage", "reason"], registry=REGISTRY
)
BATCH_SIZE = Histogram(
    "domaintok_batch_size", "Records per micro-batch", ["stage"], registry=REGISTRY,
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 4000, 8000),
)
BATCH_SECONDS = Histogram(
    "domaintok_batch_seconds", "Tokenize / encode time per micro-batch", ["stage"], registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
END_TO_END_SECONDS = Histogram(
    "domaintok_end_to_end_seconds", "Event Kafka timestamp to embedding production", ["stage"], registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
MISROUTED = Counter(
    "domaintok_misrouted_total", "Events read off their user's home partition (forwarded there)", ["stage"],
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge("domaintok_consumer_lag", "High watermark minus position, summed over assigned partitions",
                     ["stage"], registry=REGISTRY)

_served: set[int] = set()


def serve(port: int | None, host: str = "127.0.0.1") -> None:
    """Start the /metrics endpoint on host:port (the workers pass Settings.metrics_host: DOMAINTOK_METRICS_HOST)."""
    if not port or port in _served:
        return
    start_http_server(int(port), addr=host, registry=REGISTRY)
    _served.add(port)


def observe_latency(source_ts_ms: int, now: float | None = None, stage: str = "encode") -> float:
    """Seconds from an event's Kafka timestamp to now, observed in domaintok_end_to_end_seconds{stage}."""
    seconds = max(0.0, (now if now is not None else time.time()) - source_ts_ms / 1000.0)
    END_TO_END_SECONDS.labels(stage).observe(seconds)
    return seconds


def log_kv(logger: logging.Logger, event: str, **fields) -> None:
    """One structured log line: `event=<name> k=v ...` (values without spaces, so grep/awk can read them)."""
    logger.info(" ".join([f"event={event}", *(f"{k}={str(v).replace(' ', '_')}" for k, v in fields.items())]))
