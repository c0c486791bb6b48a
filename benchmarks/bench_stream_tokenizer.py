"""Tokenizer worker events/s against the best supported Faust configuration with a per-user Table, same run.

Runs, on one broker (Apache Kafka by default, `--broker embedded` for tansu), the same synthetic ecommerce events
and the same partition count for every variant:
  * pure `process_batch` (no Kafka): what tokenization alone costs;
  * baseline: a minimal Faust agent with a per-user Table doing trivial work (count per user, one Table write and
    one send per user per batch), the "best supported" settings of notes/kafka-measurements.md (uvloop, `-l info`,
    raw serializers, `use_partitioner=True` Table, producer linger 10 ms, `take_events` micro-batches);
  * our tokenizer worker (streams.app) with 1 worker, and with 2 workers in one group on separate partitions;
  * the cost of partition-independent counting (streams/routing.py): our worker fed by a murmur2 producer (every
    event on its user's home partition: today's traffic) and by a CRC32 producer (librdkafka's default: most
    events are forwarded to their home partition and read twice), and `process_batch` without routing, with
    routing and every event at home, and with routing and CRC32 partitions.
Each Faust variant gets fresh topics and a fresh group: the workers are started and Ready first, then the events
are produced as fast as the producer goes, and the clock runs from the first produce to the moment the output
accounts for every event (sum over users of the newest per-user count). Ratios are within this run only.

This file is also the baseline's Faust app: `faust -A bench_stream_tokenizer:baseline_app worker` (built on
first access from BENCH_* and KAFKA_*/DOMAINTOK_* env vars, so importing the module has no side effect).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
_COUNT = struct.Struct(">Q")


# -- the baseline Faust app (runs inside the worker subprocess) -------------------------------------------------


def _build_baseline_app():
    """Trivial work with the same Faust machinery as streams.app: per-user count in a Table, one send per user per batch."""
    import faust

    from streams.settings import KafkaSettings

    settings = KafkaSettings.from_env()
    batch_size = int(os.environ.get("BENCH_BATCH_SIZE", "4000"))
    within = float(os.environ.get("BENCH_BATCH_WITHIN", "0.2"))
    app = faust.App(
        os.environ["BENCH_APP_ID"], **settings.faust_settings(), store="memory://",
        consumer_auto_offset_reset="earliest", producer_linger=0.01, producer_max_batch_size=262144,
    )
    raw = {"key_serializer": "raw", "value_serializer": "raw"}
    events = app.topic(settings.topic_events, partitions=settings.partitions, **raw)
    out = app.topic(settings.topic_sequences, partitions=settings.partitions, **raw)
    counts = app.Table("user-counts", partitions=settings.partitions, use_partitioner=True, key_type=bytes,
                       value_type=bytes, schema=faust.Schema(key_type=bytes, value_type=bytes, **raw))

    @app.agent(events)
    async def count(stream):
        async for batch in stream.take_events(batch_size, within=within):
            per_user: dict[bytes, int] = {}
            for ev in batch:
                key = ev.message.key
                per_user[key] = per_user.get(key, 0) + 1
            for key, n in per_user.items():
                old = counts.get(key)
                value = _COUNT.pack((_COUNT.unpack(old)[0] if old else 0) + n)
                counts[key] = value
                await out.send(key=key, value=value)

    return app


def __getattr__(name: str):
    if name == "baseline_app":
        app = _build_baseline_app()
        globals()["baseline_app"] = app
        return app
    raise AttributeError(name)


# -- the benchmark driver ----------------------------------------------------------------------------------------


def _start_baseline(settings, app_id: str, log_path: Path, batch_size: int, within: float) -> subprocess.Popen:
    from localkafka.demo import worker_env

    env = worker_env(settings, BENCH_APP_ID=app_id, BENCH_BATCH_SIZE=str(batch_size), BENCH_BATCH_WITHIN=str(within))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "faust", "--loop", "uvloop", "-A", "bench_stream_tokenizer:baseline_app",
            "worker", "-l", "info", "--without-web"]
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _fresh_settings(base, tag: str):
    from localkafka.broker import ensure_topics

    prefix = f"bench-{tag}-{uuid.uuid4().hex[:6]}"
    settings = base.replace(topic_events=f"{prefix}.events", topic_sequences=f"{prefix}.out",
                            topic_embeddings=f"{prefix}.emb", topic_dead_letter=f"{prefix}.dead")
    ensure_topics(settings)
    return settings


def _count_of(kind: str):
    """Output record -> (user key, that user's event count so far)."""
    from streams.records import decode_sequence

    if kind == "baseline":
        return lambda m: (m.key(), _COUNT.unpack(m.value())[0])

    def ours(m):
        rec = decode_sequence(m.value())
        return rec.user_id, rec.n_events

    return ours


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_variant(kind: str, base_settings, work: Path, rows, tok, tok_dir, n_workers: int, args,
                consumer: str = "", partitioner: str = "murmur2_random") -> tuple[float, float]:
    """(events/s wall clock, events per worker CPU-second) of one Faust variant ("baseline" or "ours") with
    `n_workers` workers, from the first produce until the output accounts for every event.

    The CPU figure is what a worker does with a whole core: on a shared machine it is the stable one.

    `consumer` is our worker's DOMAINTOK_CONSUMER ("faust": stock Faust consumer, "batch": streams/fast_consumer.py).
    `partitioner`: the producer's librdkafka partitioner ("consistent_random" is CRC32, librdkafka's default)."""
    from confluent_kafka import Consumer

    from streams.clients import EventProducer
    from localkafka.demo import producer_overrides, start_tokenizer, stop_process, wait_ready

    settings = _fresh_settings(base_settings, kind)
    app_id = f"bench-{kind}-{uuid.uuid4().hex[:6]}"
    logs = [work / f"{app_id}-{i}.log" for i in range(n_workers)]
    procs: list[subprocess.Popen] = []
    extra = {"DOMAINTOK_BATCH_SIZE": str(args.batch_size), "DOMAINTOK_BATCH_WITHIN": str(args.within)}
    extra.update(dict(kv.split("=", 1) for kv in args.env))
    if consumer:
        extra["DOMAINTOK_CONSUMER"] = consumer
    try:
        for i, log in enumerate(logs):
            if kind == "baseline":
                procs.append(_start_baseline(settings, app_id, log, args.batch_size, args.within))
            else:
                procs.append(start_tokenizer(settings, tok_dir, app_id, log, **extra))
            wait_ready(procs[-1], log, timeout=180)
        if n_workers > 1:
            time.sleep(args.settle)  # the first worker's rebalance after the second joined
            for p, log in zip(procs, logs):
                wait_ready(p, log, timeout=60)
        consumer = Consumer(base_settings.confluent_consumer(f"reader-{app_id}"))
        consumer.subscribe([settings.topic_sequences])
        count_of = _count_of(kind)
        best: dict = {}
        total = 0
        cpu0 = sum(cpu_seconds(p.pid) for p in procs)
        t0 = time.perf_counter()
        with EventProducer(settings, fingerprint=tok.fingerprint, partitioner=partitioner,
                           **producer_overrides()) as producer:
            producer.send_many(rows)
        deadline = time.monotonic() + args.timeout
        while total < len(rows) and time.monotonic() < deadline:
            for m in consumer.consume(5000, 0.2):
                if m.error():
                    continue
                user, n = count_of(m)
                prev = best.get(user, 0)
                if n > prev:
                    best[user] = n
                    total += n - prev
        elapsed = time.perf_counter() - t0
        cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu0
        consumer.close()
        if total < len(rows):
            raise SystemExit(f"{kind} x{n_workers}: only {total}/{len(rows)} events accounted for after {args.timeout} s; logs: {logs}")
    finally:
        for p in procs:
            stop_process(p)
        gc.collect()  # librdkafka handles in reference cycles: close them before the broker goes away
    return len(rows) / elapsed, len(rows) / cpu


def pure_rate(rows, tok, batch_size: int, routing: str = "none", partitions: int = 8) -> float:
    """process_batch events per CPU-second. `routing`: "none" (no home check: the code before partition-independent
    counting), "home" (every event on its home partition), "crc32" (events on their CRC32 partition: the ones off
    their home partition are returned as forwards, then folded when they come back, as the worker does)."""
    import zlib

    import msgspec

    from streams.records import event_headers
    from streams.routing import HomePartitions
    from streams.tokenizer_agent import EventDecoders, Message, process_batch

    enc = msgspec.json.Encoder()
    headers = event_headers(tok.fingerprint)
    home = None if routing == "none" else HomePartitions(partitions)

    def partition(key: bytes) -> int:
        return zlib.crc32(key) % partitions if routing == "crc32" else home(key) if home else 0

    msgs = [Message(k, enc.encode(r), headers, "e", partition(k), i, 0)
            for i, (k, r) in enumerate((r.user_id.encode(), r) for r in rows)]
    state: dict = {}
    dec = EventDecoders(tok.event_struct)
    t0 = time.process_time()  # CPU time: comparable with the workers' CPU figures on a shared machine
    for i in range(0, len(msgs), batch_size):
        result = process_batch(tok, dec, msgs[i : i + batch_size], state, tok.max_length, home=home)
        if result.forwards:
            back = [Message(f.key, f.value, f.headers, "e", f.partition, len(msgs) + i + j, 0)
                    for j, f in enumerate(result.forwards)]
            process_batch(tok, dec, back, state, tok.max_length, home=home)
    return len(msgs) / (time.process_time() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker", choices=("apache", "embedded"), default="apache")
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4000)
    ap.add_argument("--within", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=1, help="baseline/ours alternations; medians are reported")
    ap.add_argument("--consumers", default="faust,batch",
                    help="our worker's DOMAINTOK_CONSUMER values to measure (comma-separated)")
    ap.add_argument("--two-workers", action=argparse.BooleanOptionalAction, default=True,
                    help="also 2 workers in one group (with the last of --consumers)")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds for the rebalance after a second worker joins")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="extra env for our worker (repeatable)")
    ap.add_argument("--crc32", action=argparse.BooleanOptionalAction, default=True,
                    help="also our worker fed by a CRC32 (librdkafka default) producer: the forwarding cost")
    args = ap.parse_args()

    from localkafka.broker import ApacheKafkaBroker, EmbeddedBroker
    from localkafka.demo import build_artifacts, event_rows
    from streams.settings import KafkaSettings

    broker_cls = ApacheKafkaBroker if args.broker == "apache" else EmbeddedBroker
    with tempfile.TemporaryDirectory() as tmp, broker_cls() as broker:
        work = Path(tmp)
        base = KafkaSettings(partitions=args.partitions).with_bootstrap(broker.bootstrap_servers)
        events, tok, tok_dir, _ = build_artifacts(work, "ecommerce", args.users, args.events)
        rows = event_rows(events, tok)
        pure = pure_rate(rows, tok, args.batch_size)
        pure_routed = {r: pure_rate(rows, tok, args.batch_size, r, args.partitions) for r in ("home", "crc32")}
        consumers = [c.strip() for c in args.consumers.split(",") if c.strip()]
        baseline: list[tuple[float, float]] = []
        ours: dict[str, list[tuple[float, float]]] = {c: [] for c in consumers}
        for _ in range(args.rounds):
            baseline.append(run_variant("baseline", base, work, rows, tok, tok_dir, 1, args))
            for c in consumers:
                ours[c].append(run_variant("ours", base, work, rows, tok, tok_dir, 1, args, c))
        crc32 = []
        if args.crc32:
            for _ in range(args.rounds):
                crc32.append(run_variant("ours", base, work, rows, tok, tok_dir, 1, args, consumers[-1],
                                         partitioner="consistent_random"))
        two = run_variant("ours", base, work, rows, tok, tok_dir, 2, args, consumers[-1]) if args.two_workers else None
    print(f"broker={args.broker} events={args.events} users={args.users} partitions={args.partitions} "
          f"batch=take_events({args.batch_size}, within={args.within}) rounds={args.rounds} cpus={os.cpu_count()}"
          + (f" env={' '.join(args.env)}" if args.env else ""))
    print("wall = events/s from first produce to last output; cpu = events per CPU-second of the worker process(es)")
    print(f"pure process_batch (cpu):                {pure:10,.0f} events/s")
    print(f"  with routing, every event at home:     {pure_routed['home']:10,.0f} events/s ({pure_routed['home'] / pure:.2f}x)")
    print(f"  with routing, CRC32 partitions:        {pure_routed['crc32']:10,.0f} events/s ({pure_routed['crc32'] / pure:.2f}x)")
    bw, bc = _medians(baseline)
    print(f"Faust baseline (Table, trivial work):    wall {bw:8,.0f}  cpu {bc:8,.0f}  runs {_runs(baseline)}")
    for c, runs in ours.items():
        w, cp = _medians(runs)
        print(f"tokenizer worker, DOMAINTOK_CONSUMER={c:<5} wall {w:8,.0f}  cpu {cp:8,.0f}  runs {_runs(runs)}  "
              f"ratio to baseline: wall {w / bw:.2f} cpu {cp / bc:.2f} (target >= 0.90)")
    if crc32:
        w, cp = _medians(ours[consumers[-1]])
        cw, cc = _medians(crc32)
        print(f"the same fed by a CRC32 producer:         wall {cw:8,.0f}  cpu {cc:8,.0f}  runs {_runs(crc32)}  "
              f"vs murmur2: wall {cw / w:.2f} cpu {cc / cp:.2f} (most events forwarded to their home partition)")
    if two is not None:
        w, _ = _medians(ours[consumers[-1]])
        print(f"2 workers, DOMAINTOK_CONSUMER={consumers[-1]:<5}       wall {two[0]:8,.0f}  cpu {two[1]:8,.0f}  "
              f"({two[0] / w:.2f}x one worker, wall; {os.cpu_count()} cores shared with the broker and the reader)")


def _medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def _runs(runs: list[tuple[float, float]]) -> str:
    return ", ".join(f"{w:,.0f}/{c:,.0f}" for w, c in runs)

if __name__ == "__main__":
    main()
