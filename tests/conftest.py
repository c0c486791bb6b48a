"""Test-suite wiring: shared fixtures live in their own modules, one per concern."""

pytest_plugins = ["tests.fixtures_artifacts", "tests.fixtures_kafka"]

import pytest

# Fixtures that start or use a Kafka broker: a test that asks for one is an integration test, marked so here
# once rather than by hand in every module (`-m "not integration"` then runs the pure-logic tests only).
_BROKER_FIXTURES = frozenset({"kafka", "kafka_any", "embedded_kafka", "kafka_topics", "kafka_settings", "kafka_any_settings"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
