"""Fixtures that start a real Kafka broker for the integration tests, and fresh topics for each test.

Which broker: KAFKA_BOOTSTRAP_SERVERS set -> that external broker (DOMAINTOK_TEST_BROKER=embedded says it is
tansu); else DOMAINTOK_TEST_BROKER=apache (default) starts Apache Kafka, =embedded starts the tansu broker.
"""

from __future__ import annotations

import dataclasses
import os
import uuid

import pytest

from localkafka.broker import ApacheKafkaBroker, Broker, EmbeddedBroker, ensure_topics
from streams.settings import KafkaSettings

REQUIRES_APACHE_REASON = "needs Apache Kafka ({why}); DOMAINTOK_TEST_BROKER=embedded selected the tansu broker"
DEFAULT_TEST_PARTITIONS = 4


def selected_broker_kind() -> str:
    """The kind of broker the `kafka` fixture gives: "apache" or "embedded" (decided without starting one)."""
    kind = os.environ.get("DOMAINTOK_TEST_BROKER", "apache").strip().lower() or "apache"
    if kind not in ("apache", "embedded"):
        raise pytest.UsageError(f"DOMAINTOK_TEST_BROKER={kind!r} must be 'apache' or 'embedded'")
    return kind


@dataclasses.dataclass
class KafkaUnderTest:
    """A broker the tests talk to: its address, its kind, and the handle (None for an external broker)."""

    bootstrap_servers: str
    kind: str
    broker: Broker | None = None

    def settings(self, **changes) -> KafkaSettings:
        """Settings pointed at this broker; security and topics from the environment unless `changes` says."""
        base = KafkaSettings.from_env() if self.broker is None else KafkaSettings()
        return base.replace(bootstrap_servers=self.bootstrap_servers, **changes)


def create_test_topics(kafka: KafkaUnderTest, partitions: int = DEFAULT_TEST_PARTITIONS) -> KafkaSettings:
    """Four fresh, uniquely named topics (events/sequences/embeddings/dead-letter) with `partitions` each,
    created before use (tansu would auto-create them with 4), returned as settings pointed at `kafka`."""
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    settings = kafka.settings(
        topic_events=f"{prefix}.events",
        topic_sequences=f"{prefix}.sequences",
        topic_embeddings=f"{prefix}.embeddings",
        topic_dead_letter=f"{prefix}.dead-letter",
        partitions=partitions,
    )
    ensure_topics(settings, partitions=partitions)
    return settings


def fresh_group_id(prefix: str = "test") -> str:
    # tansu wedges a group whose members left mid-rebalance: never reuse a group id across tests.
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _start(kind: str) -> Broker:
    broker = ApacheKafkaBroker() if kind == "apache" else EmbeddedBroker()
    return broker.start()


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "requires_apache(why): the test needs Apache Kafka; skipped (with `why`) on the embedded broker"
    )
    config.addinivalue_line("markers", "kafka_partitions(n): partition count of the `kafka_topics` topics")


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("requires_apache")
    if marker is None:
        return
    kind = item.callspec.params.get("kafka_any") if hasattr(item, "callspec") else None
    if kind is None:
        kind = selected_broker_kind()
    if kind == "embedded":
        why = marker.args[0] if marker.args else marker.kwargs.get("why", "unsupported feature")
        pytest.skip(REQUIRES_APACHE_REASON.format(why=why))


@pytest.fixture(scope="session")
def kafka():
    """The session's broker (see the module docstring for which one)."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    kind = selected_broker_kind()
    if external:
        yield KafkaUnderTest(external, kind)
        return
    broker = _start(kind)
    try:
        yield KafkaUnderTest(broker.bootstrap_servers, kind, broker)
    finally:
        broker.close()


@pytest.fixture(scope="session")
def embedded_kafka():
    """An embedded (tansu) broker for the session, whatever DOMAINTOK_TEST_BROKER says; starts in < 1 s."""
    broker = _start("embedded")
    try:
        yield KafkaUnderTest(broker.bootstrap_servers, "embedded", broker)
    finally:
        broker.close()


def _both_kinds() -> list[str]:
    kinds = [selected_broker_kind()]
    return kinds if "embedded" in kinds else [*kinds, "embedded"]


@pytest.fixture(params=_both_kinds())
def kafka_any(request):
    """The session broker and the embedded one in turn: tests using it run on both kinds."""
    if request.param == "embedded" and selected_broker_kind() != "embedded":
        return request.getfixturevalue("embedded_kafka")
    return request.getfixturevalue("kafka")


def _partitions_for(request) -> int:
    marker = request.node.get_closest_marker("kafka_partitions")
    return int(marker.args[0]) if marker else DEFAULT_TEST_PARTITIONS


@pytest.fixture
def kafka_topics(kafka, request) -> KafkaSettings:
    """Fresh topics for this test on the session broker (partitions: `@pytest.mark.kafka_partitions(n)`, else 4).

    Returns the settings naming them (`.topic_events`, `.topic_sequences`, ..., `.partitions`).
    """
    return create_test_topics(kafka, _partitions_for(request))


@pytest.fixture
def kafka_settings(kafka_topics) -> KafkaSettings:
    """KafkaSettings pointed at the session broker and this test's fresh topics."""
    return kafka_topics


@pytest.fixture
def kafka_any_settings(kafka_any, request) -> KafkaSettings:
    """Like `kafka_settings`, on each broker kind in turn (see `kafka_any`)."""
    return create_test_topics(kafka_any, _partitions_for(request))
