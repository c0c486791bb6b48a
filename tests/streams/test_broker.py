"""Broker launchers: start/stop/restart of Apache Kafka and tansu, topic creation, the `domaintok broker` command.

Apache Kafka keeps data across a graceful or crash restart on its log dir; tansu (memory storage) loses it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from domaintok.errors import DomaintokError
from localkafka.broker import (
    ApacheKafkaBroker,
    EmbeddedBroker,
    ensure_topics,
    fetch_kafka,
    local_or_configured,
    make_broker,
)
from streams.settings import KafkaSettings
from tests.fixtures_kafka import fresh_group_id

pytestmark = pytest.mark.integration


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "partitioner": "murmur2_random"})
    for i, value in enumerate(values):
        producer.produce(topic, value=value, key=f"user-{i % 3}".encode())
    assert producer.flush(30) == 0


def _consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[bytes]:
    # assign(), not subscribe(): reading a topic from the start needs no group, so no join wait.
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": fresh_group_id(), "enable.auto.commit": False})
    metadata = consumer.list_topics(topic, timeout=10)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.topics[topic].partitions])
    values: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(values) < expected and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                values.append(msg.value())
        # A moment more: anything beyond `expected` is a duplicate the test must see.
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            msg = consumer.poll(0.1)
            if msg is not None and msg.error() is None:
                values.append(msg.value())
    finally:
        consumer.close()
    return values


def _partition_counts(bootstrap: str, names: list[str]) -> dict[str, int]:
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    return {n: len(metadata.topics[n].partitions) for n in names if n in metadata.topics}


def test_ensure_topics_creates_exact_partition_counts(kafka_any):
    settings = kafka_any.settings()
    names = [f"t-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    assert ensure_topics(settings, names[:2], partitions=6) == {names[0]: 6, names[1]: 6}
    assert ensure_topics(settings, names[2:], partitions=1) == {names[2]: 1}
    assert _partition_counts(kafka_any.bootstrap_servers, names) == {names[0]: 6, names[1]: 6, names[2]: 1}
    # Idempotent when the counts agree, a one-line error naming the topic when they do not.
    assert ensure_topics(settings, names[:1], partitions=6) == {names[0]: 6}
    with pytest.raises(DomaintokError, match=f"{names[0]} has 6"):
        ensure_topics(settings, names[:1], partitions=8)
    assert ensure_topics(settings, names[:1], partitions=8, exact=False) == {names[0]: 6}


def test_ensure_topics_defaults_to_the_pipelines_four_topics(kafka_any):
    prefix = f"p-{uuid.uuid4().hex[:8]}"
    settings = kafka_any.settings(
        topic_events=f"{prefix}.events",
        topic_sequences=f"{prefix}.sequences",
        topic_embeddings=f"{prefix}.embeddings",
        topic_dead_letter=f"{prefix}.dead-letter",
        partitions=3,
    )
    created = ensure_topics(settings)
    assert created == {name: 3 for name in settings.topics.values()}


def test_kafka_settings_fixture_gives_fresh_topics(kafka_any_settings, kafka_any):
    counts = _partition_counts(kafka_any.bootstrap_servers, list(kafka_any_settings.topics.values()))
    assert counts == {name: 4 for name in kafka_any_settings.topics.values()}
    assert kafka_any_settings.bootstrap_servers == kafka_any.bootstrap_servers


@pytest.mark.kafka_partitions(2)
def test_kafka_partitions_marker(kafka_any_settings, kafka_any):
    assert kafka_any_settings.partitions == 2
    counts = _partition_counts(kafka_any.bootstrap_servers, [kafka_any_settings.topic_events])
    assert counts == {kafka_any_settings.topic_events: 2}


@pytest.mark.requires_apache("tansu keeps data in memory only")
def test_apache_data_survives_graceful_and_crash_restart(tmp_path):
    topic = "durable"
    with ApacheKafkaBroker(state_dir=tmp_path / "kafka") as broker:
        settings = broker.settings(KafkaSettings())
        ensure_topics(settings, [topic], partitions=2)
        _produce(broker.bootstrap_servers, topic, [b"a%d" % i for i in range(20)])
        port = broker.port
        broker.restart()
        assert broker.port == port and broker.running
        _produce(broker.bootstrap_servers, topic, [b"b%d" % i for i in range(20)])
        broker.restart(crash=True)  # SIGKILL: acked writes are in the page cache, the log is recovered
        values = _consume_all(broker.bootstrap_servers, topic, 40)
    assert sorted(values) == sorted([b"a%d" % i for i in range(20)] + [b"b%d" % i for i in range(20)])
    # The state dir was given, so close() kept it: config, log and data are there for a post-mortem.
    assert (tmp_path / "kafka" / "data" / "meta.properties").exists()
    assert (tmp_path / "kafka" / "server.log").stat().st_size > 0


def test_embedded_broker_restart_loses_memory_storage():
    with EmbeddedBroker() as broker:
        settings = broker.settings(KafkaSettings())
        ensure_topics(settings, ["volatile"], partitions=1)
        _produce(broker.bootstrap_servers, "volatile", [b"x"] * 5)
        assert len(_consume_all(broker.bootstrap_servers, "volatile", 5)) == 5
        broker.restart()
        assert broker.running
        metadata = AdminClient({"bootstrap.servers": broker.bootstrap_servers}).list_topics(timeout=10)
        assert "volatile" not in metadata.topics  # documented: memory storage is lost on restart
    assert not broker.running


def test_stop_and_kill_end_the_process():
    broker = EmbeddedBroker().start()
    pid = broker.process.pid
    broker.kill()
    assert not broker.running and broker.process.returncode == -signal.SIGKILL
    broker.start()
    assert broker.process.pid != pid
    broker.close()
    assert not broker.running


def _fresh_topic_settings(**changes) -> KafkaSettings:
    prefix = f"l-{uuid.uuid4().hex[:8]}"
    return KafkaSettings(topic_events=f"{prefix}.events", topic_sequences=f"{prefix}.sequences",
                         topic_embeddings=f"{prefix}.embeddings", topic_dead_letter=f"{prefix}.dead-letter", **changes)


def test_local_or_configured_starts_a_broker_only_without_bootstrap(embedded_kafka):
    with local_or_configured(_fresh_topic_settings(partitions=2)) as (settings, broker):
        assert broker is not None and broker.kind == "embedded" and broker.running
        names = list(settings.topics.values())
        assert _partition_counts(settings.bootstrap_servers, names) == {n: 2 for n in names}
    assert not broker.running
    given = _fresh_topic_settings(partitions=3, bootstrap_servers=embedded_kafka.bootstrap_servers)
    with local_or_configured(given) as (settings, broker):
        assert broker is None and settings == given
        names = list(settings.topics.values())
        assert _partition_counts(settings.bootstrap_servers, names) == {n: 3 for n in names}


def test_unknown_kind_is_a_one_line_error():
    with pytest.raises(DomaintokError, match="unknown broker kind 'zookeeper'"):
        make_broker("zookeeper")


@pytest.mark.requires_apache("it checks the Maven fetch of Apache Kafka")
def test_fetch_is_cached_and_fast():
    jars = fetch_kafka()
    assert any(j.name.startswith("kafka_2.13-") for j in jars)
    assert any(j.name.startswith("log4j-slf4j-impl-") for j in jars)
    started = time.monotonic()
    assert fetch_kafka() == jars
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize(
    "kind", ["embedded", pytest.param("apache", marks=pytest.mark.requires_apache("it starts Apache Kafka"))]
)
def test_broker_command_runs_until_sigterm(tmp_path, kind):
    env = {**os.environ, "DOMAINTOK_TOPIC_EVENTS": f"cli-{uuid.uuid4().hex[:6]}", "DOMAINTOK_PARTITIONS": "3"}
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    extra = ["--data-dir", str(tmp_path / "kafka")] if kind == "apache" else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "domaintok.cli", "broker", "--kind", kind, "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        bootstrap = None
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("export KAFKA_BOOTSTRAP_SERVERS="):
                bootstrap = line.strip().split("=", 1)[1]
                break
        assert bootstrap, lines + [proc.stderr.read() if proc.poll() is not None else ""]
        counts = _partition_counts(bootstrap, [env["DOMAINTOK_TOPIC_EVENTS"]])
        assert counts == {env["DOMAINTOK_TOPIC_EVENTS"]: 3}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0
        if kind == "apache":  # a given --data-dir is kept: the next run starts on the same data
            assert (tmp_path / "kafka" / "data" / "meta.properties").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_topics_command_creates_the_pipeline_topics(kafka_any):
    from click.testing import CliRunner

    from domaintok.cli import cli

    settings = _fresh_topic_settings(bootstrap_servers=kafka_any.bootstrap_servers)
    result = CliRunner().invoke(cli, ["broker", "topics", "--partitions", "2"], env=settings.to_env())
    assert result.exit_code == 0, result.output
    names = list(settings.topics.values())
    assert result.output.splitlines() == [f"{n}\t2 partitions" for n in names]
    assert _partition_counts(kafka_any.bootstrap_servers, names) == {n: 2 for n in names}
