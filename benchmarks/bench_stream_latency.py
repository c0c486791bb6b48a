"""End-to-end latency (event Kafka timestamp -> embedding received) at a fixed offered load, tiny model on CPU.

Embedded broker; tokenizer (Faust) and encoder workers as subprocesses, as in `domaintok demo`.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--users", type=int, default=500)
    args = ap.parse_args()
    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.clients import EmbeddingConsumer, EventProducer
    from streams.demo import build_artifacts, event_rows, producer_overrides, start_encoder, start_tokenizer, stop_process, wait_ready
    from streams.settings import KafkaSettings

    n = int(args.rate * args.duration)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        work = Path(tmp)
        settings = KafkaSettings(partitions=4).with_bootstrap(broker.bootstrap_servers)
        ensure_topics(settings)
        events, tok, tok_dir, model_dir = build_artifacts(work, "ecommerce", args.users, n)
        rows = event_rows(events, tok)
        procs = [start_tokenizer(settings, tok_dir, "lat-tok", work / "tok.log", DOMAINTOK_BATCH_WITHIN="0.1"),
                 start_encoder(settings, model_dir, "lat-enc", work / "enc.log", "--batch-within", "0.1", "--batch-size", "2000", "--device", "cpu")]
        try:
            wait_ready(procs[0], work / "tok.log")
            time.sleep(2)  # encoder group join
            lat: list[float] = []

            def produce():
                with EventProducer(settings, fingerprint=tok.fingerprint, **producer_overrides(), **{"linger.ms": 1}) as p:
                    t0 = time.monotonic()
                    step = max(args.rate // 100, 1)
                    for i in range(0, n, step):
                        p.send_many(rows[i : i + step])
                        delay = t0 + (i + step) / args.rate - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)

            thread = threading.Thread(target=produce)
            t_start = time.monotonic()
            thread.start()
            with EmbeddingConsumer(settings) as reader:
                while time.monotonic() < t_start + args.duration + 15:
                    for rec in reader.poll_batch(5000, timeout=0.2):
                        lat.append(time.time() - rec.source_ts_ms / 1000)
                    if not thread.is_alive() and time.monotonic() > t_start + args.duration + 3:
                        break
            thread.join()
        finally:
            for p in procs:
                stop_process(p)
    a = np.array(lat) * 1000
    print(f"offered load {args.rate} events/s for {args.duration:.0f} s, {args.users} users; {len(a)} embeddings")
    print(f"end-to-end latency ms: p50={np.percentile(a, 50):.0f} p90={np.percentile(a, 90):.0f} "
          f"p99={np.percentile(a, 99):.0f} max={a.max():.0f}")


if __name__ == "__main__":
    main()
