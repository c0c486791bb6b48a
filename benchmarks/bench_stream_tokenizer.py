"""Tokenizer worker events/s on pre-produced events (Faust app + Table, one worker), and the pure per-batch function
alone in the same run: the gap between the two is Faust's per-message machinery.

Embedded broker, synthetic ecommerce events, 8 partitions. The Faust trivial-agent baseline of the notes is not run here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=1000)
    args = ap.parse_args()
    import msgspec

    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.clients import EventProducer
    from streams.demo import build_artifacts, event_rows, producer_overrides, start_tokenizer, stop_process, wait_ready
    from streams.records import decode_sequence, event_headers
    from streams.settings import KafkaSettings
    from streams.tokenizer_agent import EventDecoders, Message, process_batch
    from confluent_kafka import Consumer

    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        work = Path(tmp)
        settings = KafkaSettings(partitions=8).with_bootstrap(broker.bootstrap_servers)
        ensure_topics(settings)
        events, tok, tok_dir, _ = build_artifacts(work, "ecommerce", args.users, args.events)
        rows = event_rows(events, tok)
        # pure function alone
        enc = msgspec.json.Encoder()
        headers = event_headers(tok.fingerprint)
        msgs = [Message(r.user_id.encode(), enc.encode(r), headers, "e", 0, i, 0) for i, r in enumerate(rows)]
        state: dict = {}
        dec = EventDecoders(tok.event_struct)
        t0 = time.perf_counter()
        for i in range(0, len(msgs), 4000):
            process_batch(tok, dec, msgs[i : i + 4000], state, tok.max_length)
        t_pure = time.perf_counter() - t0
        with EventProducer(settings, fingerprint=tok.fingerprint, **producer_overrides()) as p:
            p.send_many(rows)
        proc = start_tokenizer(settings, tok_dir, "bench-tok", work / "tok.log")
        try:
            wait_ready(proc, work / "tok.log", timeout=120)
            t_ready = time.perf_counter()
            consumer = Consumer(settings.confluent_consumer("bench-reader"))
            consumer.subscribe([settings.topic_sequences])
            best: dict[str, int] = {}
            total = 0
            deadline = time.monotonic() + 300
            while total < args.events and time.monotonic() < deadline:
                for m in consumer.consume(5000, 0.5):
                    if m.error():
                        continue
                    rec = decode_sequence(m.value())
                    prev = best.get(rec.user_id, 0)
                    if rec.n_events > prev:
                        best[rec.user_id] = rec.n_events
                        total += rec.n_events - prev
            t_worker = time.perf_counter() - t_ready
            consumer.close()
        finally:
            stop_process(proc)
    print(f"events={args.events} users={args.users} partitions=8 batch=take_events(4000, within=0.2)")
    print(f"pure process_batch: {args.events / t_pure:,.0f} events/s")
    print(f"Faust worker (from Ready to last sequence): {total / t_worker:,.0f} events/s ({total} events in {t_worker:.1f} s)")


if __name__ == "__main__":
    main()
