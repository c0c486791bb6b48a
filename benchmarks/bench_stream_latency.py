"""End-to-end latency (event Kafka timestamp -> embedding received) at a fixed offered load, tiny model on CPU,
with where the time goes.

Apache Kafka by default (`--broker embedded` for tansu); the tokenizer (Faust) and encoder workers run as
subprocesses, as in `domaintok demo`; the producer runs in its own process so the measuring process only reads.
Per embedding, the path is split with timestamps that already travel with the records:
  tokenize: newest event's Kafka timestamp (source_ts_ms) -> the sequence record's Kafka timestamp (created by the
            tokenizer's producer: take_events window + process_batch + send);
  encode:   sequence created -> embedding produced_at (delivery to the encoder, its poll/batch window, forward pass);
  deliver:  produced_at -> embedding received here (producer flush + fetch).
The sequence timestamps come from a second reader on the sequences topic, matched by (user, n_events).
The first `--warmup` seconds are left out of the percentiles (JIT/allocator/first-fetch effects).
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def produce_at_rate(bootstrap: str, topic: str, events_path: str, fingerprint: str, rate: int, duration: float,
                    linger_ms: float) -> None:
    """Child process: produce the events of `events_path` (JSON lines of wire structs) at `rate` events/s."""
    from confluent_kafka import Producer

    from streams.records import event_headers
    from streams.settings import KafkaSettings

    settings = KafkaSettings(topic_events=topic).with_bootstrap(bootstrap)
    from aiokafka.codec import has_lz4

    conf = settings.confluent_producer(**{"linger.ms": linger_ms})
    if not has_lz4():
        conf["compression.type"] = "none"
    producer = Producer(conf)
    headers = event_headers(fingerprint)
    lines = Path(events_path).read_bytes().splitlines()
    n = min(len(lines), int(rate * duration))
    step = max(rate // 200, 1)  # a send every 5 ms
    t0 = time.monotonic()
    for i in range(0, n, step):
        for line in lines[i : i + step]:
            key, value = line.split(b"\t", 1)
            producer.produce(topic, value=value, key=key, headers=headers)
        producer.poll(0)
        delay = t0 + (i + step) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    producer.flush(30)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(usage.ru_utime + usage.ru_stime)  # CPU seconds, read by the parent


def warm_broker(settings, seconds: float, rate: int = 4000) -> None:
    """Produce and consume `rate` records/s of 500 B on a scratch topic for `seconds`: a freshly started JVM broker
    spends its first tens of seconds compiling its hot paths (JIT), and that is not the pipeline's latency."""
    if seconds <= 0:
        return
    from confluent_kafka import Consumer, Producer, TopicPartition

    from localkafka.broker import ensure_topics

    topic = "bench-broker-warmup"
    ensure_topics(settings, [topic], partitions=4)
    producer = Producer(settings.confluent_producer(**{"linger.ms": 5}))
    consumer = Consumer(settings.confluent_consumer("bench-warmup"))
    consumer.assign([TopicPartition(topic, p, 0) for p in range(4)])
    value = b"x" * 500
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        for _ in range(rate // 100):
            producer.produce(topic, value=value, key=str(i % 997).encode())
            i += 1
        producer.poll(0)
        consumer.consume(1000, 0.0)
        time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    producer.flush(30)
    consumer.close()


def _start_encoder(settings, model_dir: Path, log_path: Path, enc_args: list[str], threads: int | None):
    from localkafka.demo import start_encoder

    old = os.environ.get("OMP_NUM_THREADS")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch at import in the child
    try:
        return start_encoder(settings, model_dir, "lat-enc", log_path, *enc_args)
    finally:
        if threads:
            os.environ.pop("OMP_NUM_THREADS") if old is None else os.environ.__setitem__("OMP_NUM_THREADS", old)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _batch_stats(port: int, stage: str) -> tuple[int, float, float]:
    """(batches, mean records per batch, mean seconds per batch) from a worker's Prometheus endpoint."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("domaintok_batch_size_count", "domaintok_batch_size_sum", "domaintok_batch_seconds_sum"):
            if line.startswith(f'{name}{{stage="{stage}"}}'):
                values[name] = float(line.rsplit(" ", 1)[1])
    n = values.get("domaintok_batch_size_count", 0.0)
    if not n:
        return 0, 0.0, 0.0
    return int(n), values["domaintok_batch_size_sum"] / n, values["domaintok_batch_seconds_sum"] / n


def _write_events(rows, path: Path) -> None:
    import msgspec

    enc = msgspec.json.Encoder()
    with path.open("wb") as fh:
        for r in rows:
            fh.write(str(r.user_id).encode() + b"\t" + enc.encode(r) + b"\n")


def _pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if len(a) else float("nan")


def _line(name: str, a: np.ndarray) -> str:
    return (f"{name:<9} p50={_pct(a, 50):6.0f} p90={_pct(a, 90):6.0f} p99={_pct(a, 99):6.0f} "
            f"max={a.max() if len(a) else float('nan'):6.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--broker", choices=("apache", "embedded"), default="apache")
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--duration", type=float, default=50.0)
    ap.add_argument("--warmup", type=float, default=25.0,
                    help="seconds of load left out of the steady-state percentiles (JIT, allocator, windows filling)")
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--consumer", choices=("batch", "faust"), default="batch", help="tokenizer DOMAINTOK_CONSUMER")
    ap.add_argument("--max-length", type=int, default=None,
                    help="tokenizer window DOMAINTOK_MAX_LENGTH in tokens (default: the tokenizer's, 1024 here)")
    ap.add_argument("--tok-within", type=float, default=0.05, help="tokenizer DOMAINTOK_BATCH_WITHIN seconds")
    ap.add_argument("--enc-within", type=float, default=0.01, help="encoder --batch-within seconds")
    ap.add_argument("--enc-batch", type=int, default=2048, help="encoder --batch-size (large: dedupe when behind)")
    ap.add_argument("--enc-threads", type=int, default=1,
                    help="torch threads of the encoder (OMP_NUM_THREADS; 0 = torch default): 1 leaves a core to the rest")
    ap.add_argument("--linger-ms", type=float, default=5.0, help="event producer linger.ms")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="extra env for the tokenizer worker")
    ap.add_argument("--reader-fetch-wait-ms", type=int, default=100,
                    help="fetch.wait.max.ms of this script's two readers (embeddings, sequences)")
    ap.add_argument("--broker-warmup", type=float, default=0.0,
                    help="seconds of scratch traffic through the broker before the workers start (JVM JIT warm-up)")
    ap.add_argument("--drain", type=float, default=60.0, help="seconds after the load to wait for the backlog")
    ap.add_argument("--logs", type=Path, default=None, help="copy the workers' logs here")
    args = ap.parse_args()
    from localkafka.broker import ApacheKafkaBroker, EmbeddedBroker, ensure_topics
    from streams.clients import EmbeddingConsumer
    from localkafka.demo import build_artifacts, event_rows, start_tokenizer, stop_process, wait_ready
    from streams.records import decode_sequence
    from streams.settings import KafkaSettings

    n = int(args.rate * args.duration)
    broker_cls = ApacheKafkaBroker if args.broker == "apache" else EmbeddedBroker
    seq_ts: dict[tuple[str, int], int] = {}
    rows_out: list[tuple[float, int, int, float]] = []  # (received, source_ts_ms, produced_at_us, key for seq)
    keys: list[tuple[str, int]] = []
    with tempfile.TemporaryDirectory() as tmp, broker_cls() as broker:
        work = Path(tmp)
        settings = KafkaSettings(partitions=args.partitions).with_bootstrap(broker.bootstrap_servers)
        ensure_topics(settings)
        warm_broker(settings, args.broker_warmup)
        events, tok, tok_dir, model_dir = build_artifacts(work, "ecommerce", args.users, n)
        _write_events(event_rows(events, tok), work / "events.jsonl")
        sent = events.column(tok.schema.user_id).cast("string").to_pylist()[: int(args.rate * args.duration)]
        expected = collections.Counter(sent)
        tok_env = dict(kv.split("=", 1) for kv in args.env)
        tok_env["DOMAINTOK_CONSUMER"] = args.consumer
        if args.max_length is not None:
            tok_env["DOMAINTOK_MAX_LENGTH"] = str(args.max_length)
        if args.tok_within is not None:
            tok_env["DOMAINTOK_BATCH_WITHIN"] = str(args.tok_within)
        from localkafka.broker import free_port

        ports = {"tokenize": free_port(), "encode": free_port()}
        tok_env["DOMAINTOK_METRICS_PORT"] = str(ports["tokenize"])
        enc_args = ["--device", "cpu", "--metrics-port", str(ports["encode"])]
        if args.enc_within is not None:
            enc_args += ["--batch-within", str(args.enc_within)]
        if args.enc_batch is not None:
            enc_args += ["--batch-size", str(args.enc_batch)]
        procs = [start_tokenizer(settings, tok_dir, "lat-tok", work / "tok.log", **tok_env),
                 _start_encoder(settings, model_dir, work / "enc.log", enc_args, args.enc_threads)]
        try:
            wait_ready(procs[0], work / "tok.log", timeout=180)
            wait_ready(procs[1], work / "enc.log", marker="event=start", timeout=120)
            time.sleep(3)  # encoder group join (6 s session: ~3 s)
            stop = threading.Event()

            def read_sequences() -> None:
                from confluent_kafka import Consumer, TopicPartition

                c = Consumer(settings.confluent_consumer("lat-seq-reader", **{"fetch.wait.max.ms": args.reader_fetch_wait_ms}))
                c.assign([TopicPartition(settings.topic_sequences, p, 0) for p in range(args.partitions)])
                while not stop.is_set():
                    for m in c.consume(1000, 0.1):
                        if not m.error():
                            rec = decode_sequence(m.value())
                            seq_ts[(rec.user_id, rec.n_events)] = m.timestamp()[1]
                c.close()

            seq_thread = threading.Thread(target=read_sequences, daemon=True)
            seq_thread.start()
            producer = subprocess.Popen(
                [sys.executable, "-c", "import sys, bench_stream_latency as b; b.produce_at_rate(*sys.argv[1:5], "
                 "int(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7]))", broker.bootstrap_servers,
                 settings.topic_events, str(work / "events.jsonl"), tok.fingerprint, str(args.rate),
                 str(args.duration), str(args.linger_ms)],
                stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])},
            )
            t_start = time.time()
            best: dict[str, int] = {}
            with EmbeddingConsumer(settings, **{"fetch.wait.max.ms": args.reader_fetch_wait_ms}) as reader:
                # until every user's embedding counts all its events (the pipeline drained), or --drain seconds more
                while time.time() < t_start + args.duration + args.drain:
                    for rec in reader.poll_batch(5000, timeout=0.05):
                        rows_out.append((time.time(), rec.source_ts_ms, rec.produced_at))
                        keys.append((rec.user_id, rec.n_events))
                        best[rec.user_id] = max(best.get(rec.user_id, 0), rec.n_events)
                    if producer.poll() is not None and all(best.get(u, 0) >= c for u, c in expected.items()):
                        break
            behind = sum(1 for u, c in expected.items() if best.get(u, 0) < c)
            producer.wait()
            producer_cpu = float(producer.stdout.read().split()[-1])
            time.sleep(0.5)
            stop.set()
            seq_thread.join(5)
            load = os.getloadavg()[0]
            cpu = {name: _cpu_seconds(p.pid) for name, p in zip(("tokenizer", "encoder"), procs)}
            cpu["broker"] = _cpu_seconds(broker.process.pid)
            cpu["event producer"] = producer_cpu
            cpu["this reader"] = _cpu_seconds(os.getpid())
            stats = {stage: _batch_stats(port, stage) for stage, port in ports.items()}
        finally:
            for p in procs:
                stop_process(p)
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for name in ("tok.log", "enc.log"):
                    shutil.copy(work / name, args.logs / name)
    recv, src, prod = (np.array(c, dtype=np.float64) for c in zip(*rows_out))
    seq = np.array([seq_ts.get(k, np.nan) for k in keys], dtype=np.float64)
    steady = src / 1000 >= t_start + args.warmup
    total = (recv - src / 1000) * 1000
    tokenize = seq - src
    encode = prod / 1000 - seq
    deliver = (recv - prod / 1e6) * 1000
    s = steady & ~np.isnan(seq)
    print(f"broker={args.broker} offered load {args.rate} events/s for {args.duration:.0f} s, {args.users} users, "
          f"{args.partitions} partitions, consumer={args.consumer} max_length={args.max_length or 'tokenizer'} "
          f"tok_within={args.tok_within} enc_within={args.enc_within} enc_batch={args.enc_batch} "
          f"enc_threads={args.enc_threads or 'torch default'} linger_ms={args.linger_ms} cpus={os.cpu_count()}"
          + (f" env={' '.join(args.env)}" if args.env else ""))
    print(f"{len(recv)} embeddings, {int(steady.sum())} after the {args.warmup:.0f} s warm-up; "
          f"{int(s.sum())} matched to their sequence record; users not caught up at the end: {behind}")
    print("all embeddings: " + _line("total", total) + f"; last received {recv.max() - t_start:.1f} s after start")
    print("end-to-end " + _line("total", total[steady]))
    wall = recv.max() - t_start
    print(f"machine: 1-min load average {load:.1f} on {os.cpu_count()} cores; worker CPU over the run: "
          + ", ".join(f"{k} {v:.1f} s ({v / wall:.0%} of a core)" for k, v in cpu.items()))
    for stage, (n, size, seconds) in stats.items():
        print(f"  {stage} worker: {n} batches, mean {size:.0f} records, mean {seconds * 1000:.1f} ms of work per batch")
    when = src / 1000 - t_start
    print("over time (by event time, 5 s bins): " + "  ".join(
        f"{lo:.0f}-{lo + 5:.0f}s p50={_pct(total[sel], 50):.0f} p99={_pct(total[sel], 99):.0f}"
        for lo in np.arange(0, max(when.max(), 0) + 1e-9, 5.0) if (sel := (when >= lo) & (when < lo + 5)).any()))
    print("  stage    " + _line("tokenize", tokenize[s]))
    print("  stage    " + _line("encode", encode[s]))
    print("  stage    " + _line("deliver", deliver[s]))


if __name__ == "__main__":
    main()
