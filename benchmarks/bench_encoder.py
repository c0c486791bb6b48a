"""Encoder worker sequences/s on CPU vs a plain batched forward pass (embed_sequences) in the same run.

Apache Kafka by default (`--broker embedded` for tansu), tiny untrained model, N pre-produced sequence records of
distinct users; the worker runs with EncoderConfig's default batching (`--batch-size/--batch-within` to change).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sequences", type=int, default=5000)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--broker", choices=("apache", "embedded"), default="apache")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--batch-within", type=float, default=None)
    args = ap.parse_args()
    import torch
    from confluent_kafka import Producer

    from domaintok.models.embedding import embed_sequences
    from localkafka.broker import ApacheKafkaBroker, EmbeddedBroker, ensure_topics
    from localkafka.demo import build_artifacts
    from streams.encoder import EncoderConfig, EncoderWorker
    from streams.records import SequenceRecord, encode_record
    from streams.settings import KafkaSettings

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    broker_cls = ApacheKafkaBroker if args.broker == "apache" else EmbeddedBroker
    batching = {k: v for k, v in (("batch_size", args.batch_size), ("batch_within", args.batch_within)) if v is not None}
    with tempfile.TemporaryDirectory() as tmp, broker_cls() as broker:
        _, tok, _, model_dir = build_artifacts(Path(tmp), "finance", 20, 500)
        settings = KafkaSettings(partitions=4, topic_sequences=f"bench-{uuid.uuid4().hex[:6]}.seq").with_bootstrap(broker.bootstrap_servers)
        ensure_topics(settings)
        seqs = [rng.integers(10, tok.vocab_size, size=args.length).tolist() for _ in range(args.sequences)]
        producer = Producer(settings.confluent_producer())
        for i, s in enumerate(seqs):
            rec = SequenceRecord(user_id=f"u{i}", input_ids=[tok.bos_token_id, *s], n_events=1, last_event_ts=0,
                                 source_ts_ms=0, fingerprint=tok.fingerprint)
            producer.produce(settings.topic_sequences, key=rec.user_id.encode(), value=encode_record(rec))
        producer.flush(60)
        config = EncoderConfig(model_dir=str(model_dir), group_id=f"g-{uuid.uuid4().hex[:6]}", device="cpu", **batching)
        worker = EncoderWorker(config, settings)
        worker.consumer.subscribe([settings.topic_sequences])
        first = None
        while worker.encoded < args.sequences:
            msgs = worker.poll_batch()
            if msgs:
                first = first or time.perf_counter()
                worker.process(msgs)
        t_worker = time.perf_counter() - first
        worker.consumer.close()
        arrays = [np.asarray([tok.bos_token_id, *s]) for s in seqs]
        t1 = time.perf_counter()
        embed_sequences(worker.model, arrays, batch_size=256)
        t_plain = time.perf_counter() - t1
    print(f"broker={args.broker} sequences={args.sequences} length={args.length + 1} device=cpu threads=2 "
          f"batch_size={config.batch_size} batch_within={config.batch_within}")
    print(f"encoder worker: {args.sequences / t_worker:,.0f} sequences/s ({t_worker:.2f} s from first batch)")
    print(f"plain embed_sequences: {args.sequences / t_plain:,.0f} sequences/s ({t_plain:.2f} s)")
    print(f"ratio worker/plain: {t_plain / t_worker:.2f}")
    from streams import metrics

    count = metrics.REGISTRY.get_sample_value("domaintok_batch_size_count", {"stage": "encode"}) or 0
    total = metrics.REGISTRY.get_sample_value("domaintok_batch_size_sum", {"stage": "encode"}) or 0
    busy = metrics.REGISTRY.get_sample_value("domaintok_batch_seconds_sum", {"stage": "encode"}) or 0
    print(f"worker batches: {count:.0f}, mean {total / max(count, 1):.0f} records; forward passes {busy:.2f} s of "
          f"{t_worker:.2f} s (the rest: poll, produce, delivery wait, commit)")


if __name__ == "__main__":
    main()
