"""Throughput of the project's Kafka clients against raw confluent-kafka in the same run, on a local broker.

    .venv/bin/python benchmarks/bench_clients.py [--kind apache|embedded] [--events N] [--embeddings N]
    KAFKA_BOOTSTRAP_SERVERS=host:9092 .venv/bin/python benchmarks/bench_clients.py   # an external broker
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import click
import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domaintok.synthetic import generate_events  # noqa: E402
from localkafka.broker import ensure_topics, make_broker  # noqa: E402
from streams.clients import EmbeddingConsumer, EventProducer  # noqa: E402
from streams.records import EmbeddingRecord, encode_record, event_headers, json_encoder  # noqa: E402
from streams.settings import KafkaSettings  # noqa: E402


def _produce_blocking(producer: Producer, topic: str, value: bytes, key: bytes, headers=None) -> None:
    while True:
        try:
            producer.produce(topic, value=value, key=key, headers=headers)
            return
        except BufferError:  # local queue full: let deliveries drain
            producer.poll(0.05)


def _raw_produce(settings: KafkaSettings, topic: str, values: list[bytes], keys: list[bytes]) -> float:
    # Same broker-facing config as EventProducer; the values are encoded beforehand (raw bytes in, nothing else).
    producer = Producer(settings.confluent_producer())
    headers = event_headers("bench-fingerprint")
    started = time.perf_counter()
    for value, key in zip(values, keys):
        _produce_blocking(producer, topic, value, key, headers)
    assert producer.flush(120) == 0
    return time.perf_counter() - started


def _project_produce(settings: KafkaSettings, topic: str, events: list[dict]) -> float:
    started = time.perf_counter()
    with EventProducer(settings, topic=topic, fingerprint="bench-fingerprint") as producer:
        producer.send_many(events)
    return time.perf_counter() - started


def _raw_consume(settings: KafkaSettings, topic: str, expected: int) -> float:
    consumer = Consumer(settings.confluent_consumer(f"bench-{uuid.uuid4().hex[:8]}"))
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    seen = 0
    started = time.perf_counter()
    while seen < expected:
        seen += sum(1 for m in consumer.consume(1000, 1.0) if m.error() is None)
    elapsed = time.perf_counter() - started
    consumer.close()
    return elapsed


def _project_consume(settings: KafkaSettings, topic: str, expected: int) -> float:
    started = time.perf_counter()
    with EmbeddingConsumer(settings, topic=topic, from_beginning=True) as consumer:
        seen = sum(1 for _ in consumer.records(max_records=expected, idle_timeout=30))
    elapsed = time.perf_counter() - started
    assert seen == expected, (seen, expected)
    return elapsed


def run(settings: KafkaSettings, n_events: int, n_embeddings: int, dim: int, partitions: int) -> dict:
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    topics = {name: f"{prefix}.{name}" for name in ("raw-events", "events", "embeddings")}
    ensure_topics(settings, list(topics.values()), partitions)

    table = generate_events("finance", max(1, n_events // 100), n_events, seed=0)
    events = table.to_pylist()
    values = [json_encoder.encode(e) for e in events]
    keys = [e["user_id"].encode() for e in events]
    result: dict = {"events": n_events, "event_bytes_mean": round(float(np.mean([len(v) for v in values])), 1)}

    t_raw = _raw_produce(settings, topics["raw-events"], values, keys)
    t_ours = _project_produce(settings, topics["events"], events)
    result["produce"] = {
        "raw_confluent_msg_s": round(n_events / t_raw),
        "event_producer_msg_s": round(n_events / t_ours),
        "ratio": round(t_raw / t_ours, 3),
        "note": "raw gets pre-encoded bytes; EventProducer encodes dicts with msgspec and derives keys",
    }

    rng = np.random.default_rng(0)
    producer = Producer(settings.confluent_producer())
    now = int(time.time() * 1e6)
    for i in range(n_embeddings):
        record = EmbeddingRecord(user_id=f"u{i % 5000}", embedding=rng.standard_normal(dim).astype(np.float32).tolist(),
                                 n_events=i, last_event_ts=now, model_version="bench", produced_at=now, source_ts_ms=0)
        _produce_blocking(producer, topics["embeddings"], encode_record(record), record.user_id.encode())
    assert producer.flush(120) == 0
    t_raw = _raw_consume(settings, topics["embeddings"], n_embeddings)
    t_ours = _project_consume(settings, topics["embeddings"], n_embeddings)
    result["consume"] = {
        "embeddings": n_embeddings,
        "dim": dim,
        "raw_confluent_msg_s": round(n_embeddings / t_raw),
        "embedding_consumer_msg_s": round(n_embeddings / t_ours),
        "ratio": round(t_raw / t_ours, 3),
        "note": "raw only counts messages; EmbeddingConsumer decodes each into an EmbeddingRecord",
    }
    return result


@click.command()
@click.option("--kind", type=click.Choice(["apache", "embedded"]), default="apache", show_default=True,
              help="Broker the script starts (ignored when KAFKA_BOOTSTRAP_SERVERS is set).")
@click.option("--events", "n_events", type=int, default=200_000, show_default=True)
@click.option("--embeddings", "n_embeddings", type=int, default=50_000, show_default=True)
@click.option("--dim", type=int, default=64, show_default=True, help="Embedding size.")
@click.option("--partitions", type=int, default=8, show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write results JSON here.")
def main(kind: str, n_events: int, n_embeddings: int, dim: int, partitions: int, output: Path | None) -> None:
    """Produce and consume msg/s of EventProducer / EmbeddingConsumer vs raw confluent-kafka."""
    settings = KafkaSettings.from_env()
    if settings.bootstrap_servers:
        result = {"broker": f"external {settings.bootstrap_servers}",
                  **run(settings, n_events, n_embeddings, dim, partitions)}
    else:
        with make_broker(kind) as broker:
            result = {"broker": kind, **run(broker.settings(settings), n_events, n_embeddings, dim, partitions)}
    text = json.dumps(result, indent=2)
    click.echo(text)
    if output:
        output.write_text(text + "\n")


if __name__ == "__main__":
    main()
