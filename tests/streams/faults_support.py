"""Fault-injection harness for the online path: workers as subprocesses, steady load, a watcher, the final check.

Shared by tests/streams/test_faults.py and benchmarks/soak.py. The watcher reads the sequences and embeddings
topics from the beginning (no group) and keeps what a consumer using the max-n_events rule sees; `verify` then
says whether every produced event is reflected: each user's newest record has n_events == events produced for
that user, its window equals the offline tokenization, nothing is missing, and sequences never go backwards.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import random
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from streams.clients import EventProducer
from localkafka.demo import event_rows, producer_overrides, start_encoder, start_tokenizer, stop_process, wait_ready
from streams.records import decode_embedding, decode_sequence
from streams.settings import KafkaSettings

ENCODER_READY = "event=start"  # the encoder's first log line once the model is loaded and it subscribed


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident set size of `pid` (0 once it is gone). `field="RssAnon"`: its anonymous part (heap, buffers, queues),
    what a backlog held in memory would grow; VmRSS also counts the file-backed pages of libraries (libtorch is
    hundreds of MB), which fault in as code paths are first run, not as a backlog builds."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclasses.dataclass
class Artifacts:
    """Events (time order), their wire rows, the fitted tokenizer and the tiny model, built once per module."""

    work: Path
    events: Any
    tok: Any
    tok_dir: Path
    model_dir: Path
    rows: list
    expected: dict[str, int]  # user id -> events produced for that user
    windows: dict[str, list[int]]  # user id -> input_ids of the offline tokenization of all its events

    @classmethod
    def build(cls, work: Path, n_users: int, n_events: int, seed: int = 7) -> Artifacts:
        from localkafka.demo import build_artifacts

        events, tok, tok_dir, model_dir = build_artifacts(work, "ecommerce", n_users, n_events, seed=seed)
        users = events.column(tok.schema.user_id).cast("string").to_pylist()
        windows = {r["user_id"]: list(r["input_ids"]) for r in tok.tokenize(events).to_pylist()}
        return cls(work, events, tok, tok_dir, model_dir, event_rows(events, tok), dict(collections.Counter(users)), windows)


class Watcher(threading.Thread):
    """Reads sequences + embeddings as they come, samples lag and worker RSS; all counters are for the report."""

    def __init__(self, settings: KafkaSettings, harness: Harness, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.harness = harness
        self.interval = interval
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.seq_max: dict[str, int] = {}
        self.seq_window: dict[str, list[int]] = {}
        self.emb_max: dict[str, int] = {}
        self.seq_records = self.emb_records = 0
        self.seq_duplicates = self.emb_duplicates = 0  # records with n_events <= the user's max seen before
        self.seq_backwards: list[tuple[str, int, int]] = []  # (user, max before, n_events): state went back
        self.overcounted: list[tuple[str, int, int]] = []  # (user, produced, n_events): counted twice
        self.lag_samples: list[tuple[float, int, int]] = []  # (t, tokenizer lag, encoder lag)
        self.peak_rss: dict[str, int] = collections.defaultdict(int)
        self.rss_samples: list[tuple[float, str, int]] = []
        self.anon_samples: list[tuple[float, str, int]] = []  # RssAnon, same times as rss_samples
        self.errors: list[str] = []

    def _consumer(self) -> Consumer:
        conf = self.settings.confluent_consumer(f"faults-watch-{uuid.uuid4().hex[:8]}", **{"enable.partition.eof": False})
        consumer = Consumer(conf)
        tps = [TopicPartition(t, p, OFFSET_BEGINNING) for t in (self.settings.topic_sequences, self.settings.topic_embeddings)
               for p in range(self.settings.partitions)]
        consumer.assign(tps)
        return consumer

    def _lag_reader(self, group: str) -> Consumer:
        return Consumer(self.settings.confluent_consumer(group))

    def _lag(self, reader: Consumer, topic: str) -> int:
        tps = [TopicPartition(topic, p) for p in range(self.settings.partitions)]
        lag = 0
        for tp in reader.committed(tps, timeout=2):
            low, high = reader.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=2)
            lag += high - (tp.offset if tp.offset >= 0 else low)
        return lag

    def _on_record(self, msg) -> None:
        if msg.topic() == self.settings.topic_sequences:
            rec = decode_sequence(msg.value())
            self.seq_records += 1
            best = self.seq_max.get(rec.user_id, 0)
            if rec.n_events <= best:
                self.seq_duplicates += 1
                if rec.n_events < best:
                    self.seq_backwards.append((rec.user_id, best, rec.n_events))
            else:
                self.seq_max[rec.user_id] = rec.n_events
                self.seq_window[rec.user_id] = rec.input_ids
            produced = self.harness.artifacts.expected.get(rec.user_id, 0)
            if rec.n_events > produced:
                self.overcounted.append((rec.user_id, produced, rec.n_events))
        else:
            rec = decode_embedding(msg.value())
            self.emb_records += 1
            if rec.n_events <= self.emb_max.get(rec.user_id, 0):
                self.emb_duplicates += 1
            else:
                self.emb_max[rec.user_id] = rec.n_events

    def _sample(self, readers: dict[str, Consumer]) -> None:
        now = time.monotonic()
        with contextlib.suppress(Exception):  # lag is best effort while the broker restarts
            self.lag_samples.append((now, self._lag(readers["tok"], self.settings.topic_events),
                                     self._lag(readers["enc"], self.settings.topic_sequences)))
        for name, proc in list(self.harness.procs.items()):
            role = name.rstrip("0123456789")
            rss = rss_bytes(proc.pid) if proc.poll() is None else 0
            anon = rss_bytes(proc.pid, "RssAnon") if rss else 0
            self.peak_rss[role] = max(self.peak_rss[role], rss)
            if rss:
                self.rss_samples.append((now, role, rss))
                self.anon_samples.append((now, role, anon))

    def run(self) -> None:
        consumer = self._consumer()
        readers = {"tok": self._lag_reader(self.harness.app_id), "enc": self._lag_reader(self.harness.encoder_group)}
        next_sample = 0.0
        try:
            while not self.stop_event.is_set():
                for msg in consumer.consume(2000, timeout=0.2):
                    if msg.error():
                        if msg.error().code() != KafkaError._PARTITION_EOF:
                            self.errors.append(msg.error().str())
                        continue
                    with self.lock:
                        self._on_record(msg)
                if time.monotonic() >= next_sample:
                    self._sample(readers)
                    next_sample = time.monotonic() + self.interval
        except Exception as exc:  # reported by verify(): a dead watcher must fail the test, not hang it
            self.errors.append(repr(exc))
        finally:
            consumer.close()
            for reader in readers.values():
                reader.close()

    def complete(self) -> bool:
        expected = self.harness.artifacts.expected
        with self.lock:
            return all(self.emb_max.get(u, 0) >= n for u, n in expected.items())

    def rss_by_lag(self, role: str, anon: bool = False) -> tuple[int, int]:
        """(peak RSS of `role` before the encoder lag first passed 10% of its max, peak RSS while it was over 50%);
        `anon`: of its anonymous memory (RssAnon) instead."""
        lag_at = {t: enc for t, _, enc in self.lag_samples}
        top = max(lag_at.values(), default=0)
        rising = min((t for t, lag in lag_at.items() if lag > top * 0.1), default=float("inf"))
        samples = self.anon_samples if anon else self.rss_samples
        low = [rss for t, r, rss in samples if r == role and t < rising]
        high = [rss for t, r, rss in samples if r == role and t in lag_at and lag_at[t] >= top * 0.5]
        return max(low, default=0), max(high, default=0)

    @property
    def max_lag(self) -> tuple[int, int]:
        return (max((s[1] for s in self.lag_samples), default=0), max((s[2] for s in self.lag_samples), default=0))


class Producer(threading.Thread):
    """Sends the events at a steady rate (chunks every 0.1 s); a broker restart only delays deliveries.

    `partitioners`: librdkafka partitioner names, one producer each; events go to them in turn (every user's events
    spread over all of them), e.g. ("murmur2_random", "consistent_random") for a Java-style and a kcat-style client.
    """

    def __init__(self, settings: KafkaSettings, artifacts: Artifacts, rate: float,
                 partitioners: tuple[str, ...] = ("murmur2_random",)) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.artifacts = artifacts
        self.rate = rate
        self.partitioners = partitioners
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rows = self.artifacts.rows
        step = max(int(self.rate / 10), 1)
        try:
            with contextlib.ExitStack() as stack:
                outs = [stack.enter_context(EventProducer(self.settings, fingerprint=self.artifacts.tok.fingerprint,
                                                          partitioner=name, **producer_overrides()))
                        for name in self.partitioners]
                t0 = time.monotonic()
                for start in range(0, len(rows), step):
                    chunk = rows[start : start + step]
                    for i, out in enumerate(outs):
                        out.send_many(chunk[i :: len(outs)])
                    self.sent = min(start + step, len(rows))
                    delay = t0 + self.sent / self.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                for out in outs:
                    out.flush(120)
        except BaseException as exc:
            self.error = exc


@dataclasses.dataclass
class Harness:
    """Workers of one pipeline (fresh topics, fresh groups): start, kill -9, SIGTERM, restart, wait for readiness."""

    settings: KafkaSettings
    artifacts: Artifacts
    app_id: str = dataclasses.field(default_factory=lambda: f"faults-{uuid.uuid4().hex[:8]}")
    encoder_args: tuple[str, ...] = ()
    tokenizer_env: dict[str, str] = dataclasses.field(default_factory=dict)
    procs: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)
    watcher: Watcher | None = None  # set by run_load, for tests that look at lag/RSS samples
    starts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    kills: int = 0
    terms: int = 0
    kills_by_role: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    stopped: set[str] = dataclasses.field(default_factory=set)  # killed/stopped on purpose and not restarted (yet)

    @property
    def encoder_group(self) -> str:
        return f"enc-{self.app_id}"

    def log_path(self, name: str) -> Path:
        return self.artifacts.work / f"{self.app_id}-{name}-{self.starts[name]}.log"

    def start(self, name: str, wait: bool = True) -> subprocess.Popen:
        """Start worker `name` ("tokenizer", "tokenizer2", "encoder"); with `wait`, block until it is ready."""
        self.starts[name] += 1
        self.stopped.discard(name)
        log = self.log_path(name)
        if name.startswith("tokenizer"):
            # F_DATADIR: Faust's app directory (it creates one even for memory:// tables) outside the checkout
            # 1 s commits: restarts resume from a committed offset with a backlog (faust-streaming issue 596's setting)
            env = {"F_DATADIR": str(self.artifacts.work / "faust-data"), "DOMAINTOK_COMMIT_INTERVAL": "1.0",
                   **self.tokenizer_env}
            proc = start_tokenizer(self.settings, self.artifacts.tok_dir, self.app_id, log, **env)
        else:
            proc = start_encoder(self.settings, self.artifacts.model_dir, self.encoder_group, log, *self.encoder_args)
        self.procs[name] = proc
        if wait:
            self.wait_ready(name)
        return proc

    def wait_ready(self, name: str, timeout: float = 120.0) -> None:
        marker = ENCODER_READY if name.startswith("encoder") else "[^Worker]: Ready"
        wait_ready(self.procs[name], self.log_path(name), marker=marker, timeout=timeout)

    def kill(self, name: str) -> None:
        """kill -9: no flush, no commit, no leave-group."""
        proc = self.procs[name]
        assert proc.poll() is None, f"{name} died by itself (exit {proc.returncode}); see {self.log_path(name)}"
        proc.kill()
        proc.wait(10)
        self.stopped.add(name)
        self.kills += 1
        self.kills_by_role[name.rstrip("0123456789")] += 1

    def terminate(self, name: str) -> None:
        """SIGTERM: the graceful stop a rolling deploy does."""
        proc = self.procs[name]
        assert proc.poll() is None, f"{name} died by itself (exit {proc.returncode}); see {self.log_path(name)}"
        stop_process(proc, timeout=30)
        self.stopped.add(name)
        self.terms += 1

    def alive(self) -> dict[str, int | None]:
        """Exit status (None while running) of each worker that should be running."""
        return {name: proc.poll() for name, proc in self.procs.items() if name not in self.stopped}

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop_process(proc)


def kill_loop(harness: Harness, name: str, kills: int, rng: random.Random, up: tuple[float, float] = (0.5, 3.0),
              down: tuple[float, float] = (0.3, 1.5), signal: str = "kill") -> None:
    """`kills` times: let `name` run a random while, kill it (a backlog builds while it is down), restart it."""
    for _ in range(kills):
        time.sleep(rng.uniform(*up))
        (harness.kill if signal == "kill" else harness.terminate)(name)
        time.sleep(rng.uniform(*down))
        harness.start(name)


@dataclasses.dataclass
class Outcome:
    """What one run produced and what a max-n_events consumer saw; `problems()` is empty when nothing was lost."""

    produced: int
    users: int
    reflected: int  # events reflected in the final embeddings (sum of each user's max n_events, capped)
    lost: int
    missing_users: list[str]
    wrong_users: dict[str, tuple[int, int]]  # user -> (produced, final n_events)
    wrong_windows: list[str]
    seq_backwards: list
    overcounted: list
    seq_records: int
    seq_duplicates: int
    emb_records: int
    emb_duplicates: int
    kills: int
    terms: int
    max_lag_tokenizer: int
    max_lag_encoder: int
    peak_rss: dict[str, int]
    seconds: float
    errors: list[str]

    def problems(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"{self.lost} events lost")
        if self.missing_users:
            out.append(f"users without an embedding: {self.missing_users[:5]}")
        if self.wrong_users:
            out.append(f"users with n_events != produced: {dict(list(self.wrong_users.items())[:5])}")
        if self.wrong_windows:
            out.append(f"users whose window differs from the offline tokenization: {self.wrong_windows[:5]}")
        if self.seq_backwards:
            out.append(f"sequence n_events went backwards: {self.seq_backwards[:5]}")
        if self.overcounted:
            out.append(f"events counted twice: {self.overcounted[:5]}")
        if self.errors:
            out.append(f"watcher/producer errors: {self.errors[:3]}")
        return out

    def report(self) -> str:
        rss = " ".join(f"{k}={v / 2**20:.0f}MiB" for k, v in sorted(self.peak_rss.items()))
        return (f"produced={self.produced} reflected={self.reflected} lost={self.lost} users={self.users} "
                f"kills={self.kills} sigterms={self.terms} seq_records={self.seq_records} "
                f"seq_duplicates={self.seq_duplicates} emb_records={self.emb_records} "
                f"emb_duplicates={self.emb_duplicates} max_lag_tokenizer={self.max_lag_tokenizer} "
                f"max_lag_encoder={self.max_lag_encoder} peak_rss[{rss}] seconds={self.seconds:.0f}")


def finish(harness: Harness, watcher: Watcher, producer: Producer, t0: float, timeout: float = 120.0,
           settle: float = 2.0) -> Outcome:
    """Wait for the producer, then until every user's embedding is complete (or `timeout`); stop and summarize."""
    producer.join(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not watcher.complete():
        dead = {n: rc for n, rc in harness.alive().items() if rc is not None}
        if dead:
            break  # a worker died by itself: report it below instead of waiting out the timeout
        time.sleep(0.5)
    time.sleep(settle)  # late duplicates (re-sent records) still count
    seconds = time.monotonic() - t0
    watcher.stop_event.set()
    watcher.join(10)
    art = harness.artifacts
    with watcher.lock:
        final = dict(watcher.emb_max)
        wrong = {u: (n, final.get(u, 0)) for u, n in art.expected.items() if final.get(u, 0) != n}
        wrong_windows = [u for u, ids in art.windows.items()
                         if watcher.seq_max.get(u) == art.expected[u] and watcher.seq_window.get(u) != ids]
        errors = list(watcher.errors)
    if producer.error is not None:
        errors.append(f"producer: {producer.error!r}")
    dead = {n: rc for n, rc in harness.alive().items() if rc is not None}
    if dead:
        errors.append(f"workers exited by themselves: {dead}")
    reflected = sum(min(final.get(u, 0), n) for u, n in art.expected.items())
    return Outcome(
        produced=producer.sent, users=len(art.expected), reflected=reflected, lost=producer.sent - reflected,
        missing_users=[u for u in art.expected if u not in final], wrong_users=wrong, wrong_windows=wrong_windows,
        seq_backwards=watcher.seq_backwards, overcounted=watcher.overcounted, seq_records=watcher.seq_records,
        seq_duplicates=watcher.seq_duplicates, emb_records=watcher.emb_records, emb_duplicates=watcher.emb_duplicates,
        kills=harness.kills, terms=harness.terms, max_lag_tokenizer=watcher.max_lag[0],
        max_lag_encoder=watcher.max_lag[1], peak_rss=dict(watcher.peak_rss), seconds=seconds, errors=errors,
    )


def run_load(harness: Harness, rate: float, faults, *, workers: tuple[str, ...] = ("tokenizer", "encoder"),
             timeout: float = 120.0, partitioners: tuple[str, ...] = ("murmur2_random",),
             check_commits: bool = True) -> Outcome:
    """Start `workers`, produce every event at `rate`/s while `faults(harness)` runs, then check the outcome.

    `check_commits`: once every event is reflected, the tokenizer group's committed offset must reach the end of
    every events partition within a few commit intervals (a partition that stops committing replays ever more)."""
    for name in workers:
        harness.start(name, wait=False)
    for name in workers:
        harness.wait_ready(name)
    watcher = harness.watcher = Watcher(harness.settings, harness)
    producer = Producer(harness.settings, harness.artifacts, rate, partitioners)
    t0 = time.monotonic()
    watcher.start()
    producer.start()
    try:
        faults(harness)
        outcome = finish(harness, watcher, producer, t0, timeout=timeout)
        if check_commits and not outcome.problems():
            outcome.errors += commits_reach_end(harness.settings, harness.app_id, timeout=8.0)
        return outcome
    finally:
        watcher.stop_event.set()
        harness.stop_all()


def committed_offsets(settings: KafkaSettings, group: str, topic: str | None = None) -> dict[int, int]:
    """The group's committed offset per partition of `topic` (default: the events topic); -1001 where none."""
    topic = topic or settings.topic_events
    consumer = Consumer(settings.confluent_consumer(group))
    try:
        tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
        return {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)}
    finally:
        consumer.close()


def end_offsets(settings: KafkaSettings, topic: str | None = None) -> dict[int, int]:
    """The log end offset (high watermark) of each partition of `topic` (default: the events topic)."""
    topic = topic or settings.topic_events
    consumer = Consumer(settings.confluent_consumer(f"ends-{uuid.uuid4().hex[:8]}"))
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in range(settings.partitions)}
    finally:
        consumer.close()


def commits_reach_end(settings: KafkaSettings, group: str, timeout: float) -> list[str]:
    """[] once `group`'s committed offsets equal the events topic's log ends, else one line saying where not."""
    ends = end_offsets(settings)
    deadline = time.monotonic() + timeout
    committed = committed_offsets(settings, group)
    while committed != ends and time.monotonic() < deadline:
        time.sleep(0.5)
        committed = committed_offsets(settings, group)
    if committed == ends:
        return []
    behind = {p: (committed.get(p), end) for p, end in ends.items() if committed.get(p) != end}
    return [f"tokenizer commits stalled {timeout:.0f} s after the end (partition: (committed, end)): {behind}"]
