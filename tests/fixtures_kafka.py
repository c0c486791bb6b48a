"""Fixtures that start a real Kafka broker for the integration tests."""
