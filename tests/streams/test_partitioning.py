"""Any producer's partitioner, on Apache Kafka: users whose events two clients put on different partitions are
counted once per event on their home partition (2 tokenizer workers, a kill -9 in the middle), and a partition the
position guard sought over keeps committing.

The partitioners are librdkafka's: `murmur2_random` (what Java clients, Faust and `domaintok produce` do) and
`consistent_random` (CRC32, the default of kcat and every librdkafka client).
"""

from __future__ import annotations

import dataclasses
import time
import zlib

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from streams.positions import position_key
from streams.routing import home_partition
from tests.streams.faults_support import Artifacts, Harness, Producer as LoadProducer, committed_offsets, end_offsets, run_load

N_USERS = 60
N_EVENTS = 3000
TWO_CLIENTS = ("murmur2_random", "consistent_random")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return Artifacts.build(tmp_path_factory.mktemp("partitioning"), N_USERS, N_EVENTS, seed=11)


def test_home_partition_is_librdkafkas_murmur2(kafka_settings):
    """The home partition the worker computes is where a murmur2 producer puts the key (Java's default)."""
    settings = kafka_settings
    producer = Producer(settings.confluent_producer(partitioner="murmur2_random"))
    delivered: list[tuple[bytes, int]] = []
    keys = [f"user-{i}".encode() for i in range(200)]
    for key in keys:
        producer.produce(settings.topic_events, key=key, value=b"{}",
                         on_delivery=lambda err, msg: delivered.append((msg.key(), msg.partition())))
    producer.flush(30)
    assert len(delivered) == len(keys)
    assert all(p == home_partition(k, settings.partitions) for k, p in delivered)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.requires_apache("kill -9 recovery relies on Table changelog recovery and committed offsets")
def test_two_partitioners_two_tokenizers_kill9_every_event_counted_once(kafka_settings, artifacts):
    """Each user's events alternate between a murmur2 and a CRC32 producer, so most users have events on two
    partitions; two tokenizer workers share the partitions and one is killed -9 and restarted mid-load."""
    users = {row.user_id.encode() for row in artifacts.rows}
    split = [k for k in users if zlib.crc32(k) % kafka_settings.partitions != home_partition(k, kafka_settings.partitions)]
    assert len(split) > len(users) / 2  # most users' events land on two partitions
    harness = Harness(kafka_settings, artifacts)

    def kill_one(h: Harness) -> None:
        time.sleep(6)
        h.kill("tokenizer2")
        time.sleep(2)
        h.start("tokenizer2")

    outcome = run_load(harness, 150, kill_one, workers=("tokenizer", "tokenizer2", "encoder"),
                       partitioners=TWO_CLIENTS, timeout=150)
    print(outcome.report())
    assert outcome.kills == 1
    assert not outcome.problems(), outcome.problems()  # n_events == produced and window == offline, per user
    assert outcome.reflected == outcome.produced == N_EVENTS
    logs = "".join(p.read_text(errors="replace") for p in artifacts.work.glob(f"{harness.app_id}-tokenizer*.log"))
    assert "event=misrouted" in logs  # detected and said in a log line (and counted in domaintok_misrouted_total)


def _wait_committed(settings, group: str, target: dict[int, int], timeout: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    committed = committed_offsets(settings, group)
    while time.monotonic() < deadline and any(committed.get(p, -1) < end for p, end in target.items()):
        time.sleep(0.5)
        committed = committed_offsets(settings, group)
    return committed


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.requires_apache("committed offsets, DeleteRecords and Table changelog recovery")
def test_commits_advance_after_a_gap_seek(kafka_settings, artifacts):
    """The tokenizer resumes on a partition whose committed offset is behind its stored position, and the events
    after that position are gone from the log (retention ran while it was down): the position guard seeks over
    the hole and then accepts it. Every partition's committed offset must then reach the log end within a few
    commit intervals (before the fix it stayed at the old committed offset while the lag grew)."""
    settings = kafka_settings
    harness = Harness(settings, artifacts, tokenizer_env={"DOMAINTOK_COMMIT_INTERVAL": "1.0"})
    group = harness.app_id
    half = len(artifacts.rows) // 2

    def produce(rows) -> None:
        producer = LoadProducer(settings, dataclasses.replace(artifacts, rows=rows), rate=100_000)
        producer.run()
        assert producer.error is None, producer.error

    harness.start("tokenizer")
    produce(artifacts.rows[:half])
    first_end = end_offsets(settings)
    committed = _wait_committed(settings, group, first_end, timeout=60)
    assert committed == first_end, (committed, first_end)
    harness.terminate("tokenizer")

    # while it is down: its committed offsets go back 40 events (it stopped before committing them), more events
    # arrive, and retention deletes the first 25 of those
    behind = {p: max(end - 40, 0) for p, end in first_end.items()}
    rewinder = Consumer(settings.confluent_consumer(group))
    rewinder.commit(offsets=[TopicPartition(settings.topic_events, p, o) for p, o in behind.items()],
                    asynchronous=False)
    rewinder.close()
    assert committed_offsets(settings, group) == behind
    produce(artifacts.rows[half:])
    admin = AdminClient(settings.confluent_admin())
    cut = {p: end + 25 for p, end in first_end.items()}
    for future in admin.delete_records([TopicPartition(settings.topic_events, p, o) for p, o in cut.items()]).values():
        future.result(30)

    harness.start("tokenizer")
    try:
        ends = end_offsets(settings)
        committed = _wait_committed(settings, group, ends, timeout=45)
        log = harness.log_path("tokenizer").read_text(errors="replace")
        assert "event=gap" in log  # the guard did seek over the hole
        assert committed == ends, f"committed {committed} never reached the log end {ends}"
    finally:
        harness.stop_all()


def test_position_keys_still_map_to_their_partitions():
    """The guard's position keys and the routing agree on murmur2 (a position must live on its own partition)."""
    for partitions in (1, 4, 8, 12):
        for p in range(partitions):
            assert home_partition(position_key(p, partitions), partitions) == p
